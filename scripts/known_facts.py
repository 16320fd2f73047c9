"""The CounterFact facts a model *states*, and the stream split that goes with them.

A fact is kept when the model's greedy continuation of its prompt starts with the true object:

    greedy(prompt, max_new_tokens=8).lstrip().startswith(ground_truth.strip())

with the model in float32 on the CPU, the prompt tokenized as the tokenizer does by default
(``add_special_tokens=True``: a BOS where the tokenizer adds one, nothing else), decoded with special
tokens skipped -- exactly what ``GET /generate?prompt=...&max_new_tokens=8`` of ``hiedit serve``
returns, so ``bench/real_model_edits.py`` sees the same answers before editing. The continuation
must start with the whole object ("French" for " French. She is ..."); a longer word that starts
with it ("Frenchman") also counts.

Greedy generation is only run for *candidates*: one batched forward pass (right padding, attention
mask) gives the next-token logits after each prompt, and a record is a candidate when a token within
--tie-tol of the maximum logit could start the object: it is the first token of " " + ground_truth,
or its text (leading whitespace stripped) is a prefix of the object or starts with it, or it is
whitespace only or an incomplete UTF-8 piece (the continuation could still reach the object). Every
other record cannot pass the rule, so the prefilter loses nothing; --audit N runs greedy on the
first N records anyway and reports any the prefilter would have dropped (expected 0).

For each kept fact the output also records its greedy continuations of the rephrase and the
locality (neighbourhood) prompt, and ``neighbour_stated``: whether the model states the neighbour
fact by the same rule (locality_prompt -> locality_ground_truth).

Output (written atomically: a temporary file in the same directory, renamed into place)::

    {"model", "source": "counterfact-edit.json", "records_scanned", "rule", "prefilter", ...,
     "facts": [{case_id, prompt, subject, ground_truth, target_new, rephrase_prompt, locality_prompt,
                locality_ground_truth, neighbour_stated, greedy: {prompt, rephrase, locality}}]}

and, next to it, ``split.json`` (see --write-split): the streams of the papers' protocol, kept
apart -- editor_train (counterfact-train.json records 0..299), dev (counterfact-val.json, all),
eval (counterfact-edit.json, from record 0 on) and known (the kept facts, a subset of the scanned
head of counterfact-edit.json) -- with the overlap checks between them.

    python scripts/known_facts.py /work/hh/models/smollm2-135m-instruct --limit 3000
    python scripts/known_facts.py gemma-3-270m --home /work/hh --limit 1500
    python scripts/known_facts.py --write-split editor_core/assets/gemma-3-270m/known_facts.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from editor_core.data import SHARED_DATA  # noqa: E402

ASSETS = REPO / "editor_core" / "assets"
COUNTERFACT = SHARED_DATA / "counterfact"
EDIT_FILE, TRAIN_FILE, VAL_FILE = "counterfact-edit.json", "counterfact-train.json", "counterfact-val.json"
EDITOR_TRAIN_N = 300  # `hiedit train --limit 300` on counterfact-train.json: its records 0..299

RULE = ("greedy continuation of the prompt (max_new_tokens {n} new tokens, float32, prompt tokenized with the "
        "tokenizer's default special tokens, decoded with special tokens skipped), leading whitespace stripped, "
        "starts with the whole true object (ground_truth, stripped); the same rule decides neighbour_stated "
        "(locality_prompt -> locality_ground_truth)")
PREFILTER = ("one batched forward pass (right padding, attention mask): a record is a candidate when a token "
             "within tie_tol of the top next-token logit is the first token of ' ' + ground_truth, or its text "
             "(lstripped) is a prefix of the object or starts with it, or it is whitespace only / an incomplete "
             "UTF-8 piece; greedy generation runs only for candidates (no record that passes the rule is dropped)")


# ---- the rule ------------------------------------------------------------------------------------------

def states(continuation: str, obj: str) -> bool:
    """The continuation, leading whitespace stripped, starts with the whole object (stripped)."""
    obj = obj.strip()
    return bool(obj) and continuation.lstrip().startswith(obj)


def could_start(token_text: str, obj: str) -> bool:
    """Whether a continuation whose first token decodes to ``token_text`` could still state ``obj``."""
    obj, text = obj.strip(), token_text.lstrip()
    if not text or "\ufffd" in text:  # whitespace only, or part of a multi-byte character: can't tell yet
        return True
    return obj.startswith(text) or text.startswith(obj)


# ---- the model -------------------------------------------------------------------------------------------

def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation as ``hiedit serve``'s GET /generate computes it (text without the prompt)."""
    import torch

    ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_k=None, top_p=None,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def candidates(model, tokenizer, records: list[dict], tie_tol: float) -> list[bool]:
    """One forward pass over ``records``' prompts (right-padded): which could pass the rule."""
    import torch

    tokenizer.padding_side = "right"
    enc = tokenizer([r["prompt"] for r in records], add_special_tokens=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    last = enc["attention_mask"].sum(dim=1) - 1
    nxt = logits[torch.arange(len(records)), last].float()  # [B, V] logits of the first new token
    special = set(tokenizer.all_special_ids)
    out = []
    for row, rec in zip(nxt, records):
        first = tokenizer(" " + rec["ground_truth"].strip(), add_special_tokens=False)["input_ids"][:1]
        near = torch.nonzero(row >= row.max() - tie_tol).flatten().tolist()
        out.append(any((first and t == first[0]) or (t not in special and could_start(tokenizer.decode([t]),
                                                                                       rec["ground_truth"]))
                       for t in near))
    return out


def scan(model, tokenizer, records: list[dict], max_new_tokens: int = 8, batch_size: int = 8,
         tie_tol: float = 1e-3, audit: int = 0, progress: bool = True) -> tuple[list[dict], dict]:
    """The facts among ``records`` the model states, and counts/timings of the scan."""
    from tqdm.auto import tqdm

    facts: list[dict] = []
    stats = {"candidates": 0, "prefilter_s": 0.0, "generate_s": 0.0, "audited": 0, "audit_misses": []}
    bar = tqdm(total=len(records), unit="fact", desc="scan", disable=not progress, mininterval=2.0)
    for lo in range(0, len(records), batch_size):
        batch = records[lo:lo + batch_size]
        t0 = time.perf_counter()
        cands = candidates(model, tokenizer, batch, tie_tol)
        stats["prefilter_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, (rec, cand) in enumerate(zip(batch, cands)):
            audited = lo + i < audit
            stats["audited"] += audited
            if not cand and not audited:
                continue
            stats["candidates"] += cand
            answer = greedy(model, tokenizer, rec["prompt"], max_new_tokens)
            if not states(answer, rec["ground_truth"]):
                continue
            if not cand:  # the prefilter would have dropped a fact the model states: a bug in could_start
                stats["audit_misses"].append(rec["case_id"])
            neighbour = greedy(model, tokenizer, rec["locality_prompt"], max_new_tokens)
            facts.append({
                "case_id": rec["case_id"], "prompt": rec["prompt"], "subject": rec["subject"],
                "ground_truth": rec["ground_truth"], "target_new": rec["target_new"],
                "rephrase_prompt": rec["rephrase_prompt"], "locality_prompt": rec["locality_prompt"],
                "locality_ground_truth": rec["locality_ground_truth"],
                "neighbour_stated": states(neighbour, rec["locality_ground_truth"]),
                "greedy": {"prompt": answer,
                           "rephrase": greedy(model, tokenizer, rec["rephrase_prompt"], max_new_tokens),
                           "locality": neighbour},
            })
        stats["generate_s"] += time.perf_counter() - t0
        bar.update(len(batch))
        bar.set_postfix(known=len(facts), candidates=stats["candidates"])
    bar.close()
    return facts, stats


# ---- the split -----------------------------------------------------------------------------------------

def read_records(path: Path) -> list[dict]:
    with open(path) as fh:
        return json.load(fh)


def build_split(known: dict, data_dir: Path = COUNTERFACT, editor_train_n: int = EDITOR_TRAIN_N) -> dict:
    """split.json for a known_facts.json document; ValueError when the streams share a case id.

    CounterFact case ids are per file, but the three files are disjoint pieces of one numbering, so a
    shared id would mean a record is in two files: checked over the whole files. The same prompt and
    subject in editor_train and dev/eval/known is reported (same_fact: whether the true object is the
    same too), not dropped: CounterFact has several facts per prompt (e.g. "The twin city of X is").
    """
    train_all = read_records(data_dir / TRAIN_FILE)
    train, dev, edit = train_all[:editor_train_n], read_records(data_dir / VAL_FILE), read_records(data_dir / EDIT_FILE)
    ids = {name: [r["case_id"] for r in recs] for name, recs in
           (("train_file", train_all), ("dev", dev), ("eval", edit))}
    shared = {f"{a}&{b}": sorted(set(ids[a]) & set(ids[b]), key=str)
              for a, b in (("train_file", "dev"), ("train_file", "eval"), ("dev", "eval"))}
    if any(shared.values()):
        raise ValueError(f"case ids shared between CounterFact files: { {k: v[:10] for k, v in shared.items() if v} }")
    for name, recs in (("train", train_all), ("dev", dev), ("eval", edit)):
        if len(set(ids["train_file" if name == "train" else name])) != len(recs):
            raise ValueError(f"{name}: duplicate case ids inside the file")

    scanned = int(known["records_scanned"])
    head = {r["case_id"]: r for r in edit[:scanned]}
    known_ids = [f["case_id"] for f in known["facts"]]
    stray = [c for c in known_ids if c not in head]
    if stray:
        raise ValueError(f"known facts not among the first {scanned} records of {EDIT_FILE}: {stray[:10]}")
    for f in known["facts"]:
        if (f["prompt"], f["ground_truth"]) != (head[f["case_id"]]["prompt"], head[f["case_id"]]["ground_truth"]):
            raise ValueError(f"known fact {f['case_id']} differs from {EDIT_FILE}'s record of that case id")

    by_ps: dict[tuple[str, str], list[dict]] = {}
    for r in train:
        by_ps.setdefault((r["prompt"], r["subject"]), []).append(r)
    known_set = set(known_ids)
    overlaps = []
    for stream, recs in (("dev", dev), ("eval", edit), ("known", [r for r in edit if r["case_id"] in known_set])):
        for r in recs:
            for t in by_ps.get((r["prompt"], r["subject"]), []):
                overlaps.append({"stream": stream, "case_id": r["case_id"], "editor_train_case_id": t["case_id"],
                                 "prompt": r["prompt"], "subject": r["subject"], "ground_truth": r["ground_truth"],
                                 "editor_train_ground_truth": t["ground_truth"],
                                 "same_fact": r["ground_truth"].strip() == t["ground_truth"].strip()})
    same_fact = [o for o in overlaps if o["same_fact"]]
    as_str = lambda xs: [str(x) for x in xs]  # noqa: E731 - split files hold case ids as strings (data.py)
    return {
        "model": known["model"],
        "format": "counterfact-flat",
        "files": {"editor_train": f"counterfact/{TRAIN_FILE}", "dev": f"counterfact/{VAL_FILE}",
                  "eval": f"counterfact/{EDIT_FILE}", "known": f"counterfact/{EDIT_FILE}"},
        "streams": {"editor_train": as_str(ids["train_file"][:editor_train_n]), "dev": as_str(ids["dev"]),
                    "eval": as_str(ids["eval"]), "known": as_str(known_ids)},
        "counts": {"editor_train": len(train), "dev": len(dev), "eval": len(edit), "known": len(known_ids),
                   "known_scanned": scanned,
                   "known_neighbour_stated": sum(bool(f.get("neighbour_stated")) for f in known["facts"])},
        "notes": (
            f"Case ids (as strings) of ../shared/data/counterfact/*.json, the papers' protocol with the streams "
            f"kept apart. editor_train: {TRAIN_FILE} records 0-{editor_train_n - 1} (what `hiedit train --limit "
            f"{editor_train_n}` trains editors on). dev: {VAL_FILE}, every record (the development stream). eval: "
            f"{EDIT_FILE}, every record in file order from record 0 (the evaluation stream). known: the records "
            f"among the first {scanned} of {EDIT_FILE} that {known['model']} states (known_facts.json, rule there), "
            f"so known is a subset of eval by design. The three files share no case id (checked over the whole "
            f"files), so no editor-training record is in dev, eval or known. Same prompt+subject as an "
            f"editor_train record: {len(overlaps)} ({len(same_fact)} with the same true object too), listed in "
            f"checks.prompt_subject_overlaps; different objects mean different facts about the same prompt."),
        "checks": {"shared_case_ids": {k: len(v) for k, v in shared.items()},
                   "prompt_subject_overlaps": overlaps},
    }


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write ``obj`` to ``path`` through a temporary sibling renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, ensure_ascii=False)
            fh.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a committed asset should be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_split(known_path: Path, data_dir: Path = COUNTERFACT, editor_train_n: int = EDITOR_TRAIN_N) -> Path:
    known = json.loads(Path(known_path).read_text())
    split = build_split(known, data_dir, editor_train_n)
    out = Path(known_path).parent / "split.json"
    write_json_atomic(out, split)
    overlaps = split["checks"]["prompt_subject_overlaps"]
    print(f"wrote {out}: editor_train {split['counts']['editor_train']}, dev {split['counts']['dev']}, eval "
          f"{split['counts']['eval']}, known {split['counts']['known']}; shared case ids: none; prompt+subject "
          f"overlaps with editor_train: {len(overlaps)}", file=sys.stderr)
    for o in overlaps:
        print(f"  overlap: {o['stream']} case {o['case_id']} / editor_train case {o['editor_train_case_id']}: "
              f"{o['prompt']!r} ({o['ground_truth']} vs {o['editor_train_ground_truth']}, same fact: "
              f"{o['same_fact']})", file=sys.stderr)
    return out


# ---- CLI -----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="known_facts.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="model directory, or a known name (smollm2-135m-instruct, "
                                             "gemma-3-270m: converted under --home on first use)")
    ap.add_argument("--home", default="/work/hh", help="where known names are converted (<home>/models/<name>)")
    ap.add_argument("--data", default=str(COUNTERFACT / EDIT_FILE), help="CounterFact file to scan (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="scan only the first N records (default: all)")
    ap.add_argument("--out", default=None, help="output JSON (default: editor_core/assets/<model>/known_facts.json)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per prefilter forward pass")
    ap.add_argument("--tie-tol", type=float, default=1e-3,
                    help="logits this close to the top one also count as the first token (batched numerics)")
    ap.add_argument("--audit", type=int, default=0, metavar="N",
                    help="also run greedy on the first N records whatever the prefilter says, and report any it "
                         "would have dropped")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the CPUs are shared)")
    ap.add_argument("--no-split", action="store_true", help="do not write split.json next to the output")
    ap.add_argument("--write-split", metavar="KNOWN_JSON", default=None,
                    help="only (re)write split.json next to KNOWN_JSON from it and the CounterFact files")
    ap.add_argument("--editor-train-n", type=int, default=EDITOR_TRAIN_N,
                    help="records of counterfact-train.json that train editors (default %(default)s)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    data_dir = Path(args.data).parent
    if args.write_split:
        try:
            write_split(Path(args.write_split), data_dir, args.editor_train_n)
        except (OSError, ValueError, KeyError) as e:
            print(f"known_facts.py --write-split: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.model:
        ap.error("a model directory or name is required (or --write-split KNOWN_JSON)")

    import torch

    torch.set_num_threads(args.threads)
    from editor_core.catalog import ModelSourceError, resolve_model
    from editor_core.model import load_model, model_id

    try:
        path = resolve_model(args.model, Path(args.home))
    except ModelSourceError as e:
        print(f"known_facts.py: {e}", file=sys.stderr)
        return 2
    t_load = time.perf_counter()
    model, tokenizer = load_model(path, dtype="float32")
    name = model_id(model)
    records = read_records(Path(args.data))[: args.limit]
    print(f"{name}: scanning {len(records)} records of {args.data} (loaded in "
          f"{time.perf_counter() - t_load:.1f}s)", file=sys.stderr)
    t0 = time.perf_counter()
    facts, stats = scan(model, tokenizer, records, args.max_new_tokens, args.batch_size, args.tie_tol,
                        args.audit, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    doc = {
        "model": name, "model_dir": str(path), "source": Path(args.data).name, "records_scanned": len(records),
        "rule": RULE.format(n=args.max_new_tokens), "prefilter": PREFILTER, "max_new_tokens": args.max_new_tokens,
        "dtype": "float32", "tie_tol": args.tie_tol, "candidates": stats["candidates"], "known": len(facts),
        "neighbour_stated": sum(f["neighbour_stated"] for f in facts),
        "audit": {"records": stats["audited"], "prefilter_misses": stats["audit_misses"]},
        "seconds": {"total": round(seconds, 1), "prefilter": round(stats["prefilter_s"], 1),
                    "generate": round(stats["generate_s"], 1)},
        "threads": args.threads, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "facts": facts,
    }
    out = Path(args.out) if args.out else ASSETS / name / "known_facts.json"
    write_json_atomic(out, doc)
    print(f"wrote {out}: {len(facts)} known of {len(records)} ({stats['candidates']} candidates), "
          f"{doc['neighbour_stated']} with the neighbour stated, {seconds:.0f}s; audit: {stats['audited']} "
          f"records, prefilter misses {stats['audit_misses']}", file=sys.stderr)
    if not args.no_split:
        try:
            write_split(out, data_dir, args.editor_train_n)
        except (OSError, ValueError, KeyError) as e:
            print(f"known_facts.py: split.json not written: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
