"""``hiedit eval-progress``: what a method stopped midway had measured, from its saved progress.

    hiedit eval-progress runs/smol-cf-n1000-alphaedit
    hiedit eval-progress docs/img/smol-cf-n1000-partial/*.partial      # kept progress files
    hiedit eval-progress docs/img/smol-cf-n1000/results.json           # finished methods, for comparison

``hiedit eval`` writes a method's progress to ``OUT/methods/NAME.partial/progress.json`` every
``--checkpoint-every`` edits and resumes from it; the row is only written when the method ends. For a
run that cannot end where it started (a session shorter than the method), this prints what the
progress holds: records done, skips and rejections, edit latency per 100 edits, and the running scores
measured every ``--every`` edits (whole-object scoring; General Retention from perplexity alone, as in
the curves of ``results.json``). Nothing is changed; the run still resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from editor_core.evaluate import MEAN_OF as SCORES  # the four scores the headline mean averages


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="OUT",
                        help="a hiedit eval --out directory, one method's NAME.partial directory or progress.json, "
                             "or a results.json (its finished methods' running scores)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list (one object per method) instead of tables")


def _summary(name: str, progress: dict) -> dict:
    latencies = [float(x) for x in progress.get("latencies", [])]
    buckets = [latencies[i:i + 100] for i in range(0, len(latencies), 100)]
    return {"method": name, "done": int(progress["done"]), "n": progress.get("n"),
            "skipped": len(progress.get("skipped", [])), "rejected": len(progress.get("rejected", [])),
            "latency_s_p50_per_100": [round(sorted(b)[len(b) // 2] / 1000, 2) for b in buckets],
            "curve": [{"edits": c["edits"], **{m: round(float(c[m]), 2) for m in SCORES},
                       "mean": round(sum(float(c[m]) for m in SCORES) / len(SCORES), 2),
                       "general_retention": round(float(c["general_retention"]), 2),
                       "perplexity": round(float(c["perplexity"]), 2), "collapsed": bool(c["collapsed"])}
                      for c in progress.get("curve", [])]}


def _table(s: dict) -> str:
    of = f" of {s['n']}" if s["n"] else ""
    lines = [f"{s['method']}: {s['done']}{of} records done, {s['skipped']} skipped, {s['rejected']} rejected"]
    if s["latency_s_p50_per_100"]:  # a results.json row keeps only its p50 over the whole stream
        lines.append("  edit latency p50 per 100 edits (s): " + " ".join(f"{x:g}" for x in s["latency_s_p50_per_100"]))
    if not s["curve"]:
        lines.append("  no running scores yet (hiedit eval --every)")
        return "\n".join(lines)
    lines += ["", "| edits | Efficacy | Generalization | Specificity | Edited Ret. | mean | General Ret. | perplexity |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in s["curve"]:
        flag = " **(collapsed)**" if c["collapsed"] else ""
        lines.append(f"| {c['edits']}{flag} | " + " | ".join(f"{c[m]:.2f}" for m in (*SCORES, "mean",
                                                                                     "general_retention"))
                     + f" | {c['perplexity']:.4g} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    summaries, errors = [], []
    for out in args.runs:
        path = Path(out)
        if path.name == "results.json":  # a finished run: every method's running scores, from its curve
            try:
                results = json.loads(path.read_text())
                summaries += [_summary(name, {"done": row["n_edits"], "n": results["n"], "curve": row["curve"]})
                              for name, row in results["methods"].items()]
            except (OSError, ValueError, KeyError, TypeError) as e:
                errors.append(f"{path}: not a readable results.json ({e})")
            continue
        found = ([path] if path.is_file() else [path / "progress.json"] if (path / "progress.json").is_file()
                 else sorted(path.glob("methods/*.partial/progress.json")))
        if not found:
            errors.append(f"{out}: no method in progress (no methods/NAME.partial/progress.json)")
        for path in found:
            try:
                summaries.append(_summary(path.parent.name.removesuffix(".partial"), json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as e:
                errors.append(f"{path}: not a readable progress file ({e})")
    for e in errors:
        print(f"hiedit eval-progress: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(summaries, indent=1))
    else:
        print("\n\n".join(_table(s) for s in summaries))
    return 2 if errors and not summaries else 0
