"""``hiedit eval-progress``: what a method stopped midway had measured, from its saved progress.

    hiedit eval-progress runs/smol-cf-n1000-alphaedit
    hiedit eval-progress docs/img/smol-cf-n1000-partial/*.partial      # kept progress files
    hiedit eval-progress docs/img/smol-cf-n1000/results.json           # finished methods, for comparison

``hiedit eval`` writes a method's progress to ``OUT/methods/NAME.partial/progress.json`` every
``--checkpoint-every`` edits and resumes from it; the row is only written when the method ends. For a
run that cannot end where it started (a session shorter than the method), this prints what the
progress holds: records done, skips and rejections, edit latency per 100 edits, and the running scores
measured every ``--every`` edits (whole-object scoring; General Retention from perplexity alone, as in
the curves of ``results.json``), and how many edits its value log holds (``values.jsonl``, MEMIT-style
methods: a restart from W^0 with that file alone replays them without the value search) with the value
search's mean step count per 100 edits. Nothing is changed; the run still resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from editor_core.evaluate import MEAN_OF as SCORES  # the four scores the headline mean averages
from editor_core.evaluate import VALUES_FILE
from editor_core.memit import ValueLog


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="OUT",
                        help="a hiedit eval --out directory, one method's NAME.partial directory or progress.json, "
                             "or a results.json (its finished methods' running scores)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list (one object per method) instead of tables")


def _holds_progress(directory: Path) -> bool:
    return (directory / "progress.json").is_file() or (directory / VALUES_FILE).is_file()


def _value_steps(directory: Path) -> list[int] | None:
    """The value search's step count of every edit ``directory``'s value log holds (None: no log)."""
    path = directory / VALUES_FILE
    if not path.is_file():
        return None
    _, entries = ValueLog.read(path)
    return [int(e["info"]["z_steps"]) for e in entries if "z_steps" in e["info"]]


def _summary(name: str, progress: dict, steps: list[int] | None = None) -> dict:
    latencies = [float(x) for x in progress.get("latencies", [])]
    buckets = [latencies[i:i + 100] for i in range(0, len(latencies), 100)]
    return {"method": name, "done": int(progress["done"]), "n": progress.get("n"),
            "values_logged": None if steps is None else len(steps),
            "value_steps_mean_per_100": None if steps is None else
            [round(sum(steps[i:i + 100]) / len(steps[i:i + 100]), 1) for i in range(0, len(steps), 100)],
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
    if s.get("values_logged") is not None:
        lines.append(f"  target values logged: {s['values_logged']} edits (a restart replays them without the value search)")
        if s["value_steps_mean_per_100"]:
            lines.append("  value search steps, mean per 100 edits: "
                         + " ".join(f"{x:g}" for x in s["value_steps_mean_per_100"]))
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
        found = ([path.parent] if path.is_file() else [path] if _holds_progress(path)
                 else [d for d in sorted(path.glob("methods/*.partial")) if _holds_progress(d)])
        if not found:
            errors.append(f"{out}: no method in progress (no methods/NAME.partial/progress.json or {VALUES_FILE})")
        for d in found:
            try:
                progress = json.loads((d / "progress.json").read_text()) if (d / "progress.json").is_file() \
                    else {"done": 0}
                summaries.append(_summary(d.name.removesuffix(".partial"), progress, _value_steps(d)))
            except (OSError, ValueError, KeyError, TypeError) as e:
                errors.append(f"{d}: not a readable progress file ({e})")
    for e in errors:
        print(f"hiedit eval-progress: {e}", file=sys.stderr)
    if args.json:
        print(json.dumps(summaries, indent=1))
    else:
        print("\n\n".join(_table(s) for s in summaries))
    return 2 if errors and not summaries else 0
