"""Two editors on one model: does HiEdit editing between RLSEdit edits cost RLSEdit its earlier edits?

RLSEdit's C remembers the keys (down_proj inputs) each past edit had when it was made. A HiEdit edit of a
gate/up projection at layer l changes the down_proj inputs of layer l and of every layer above it, so when
HiEdit edits a layer at or below RLSEdit's deepest layer, the keys in C go stale. This script measures, on
the served model (SmolLM2-135M-Instruct by default) with its committed HiEdit editor:

  alone        N RLSEdit edits, one after another (facts 0..N-1 of known_facts.json)
  interleaved  the same N RLSEdit edits, each followed by one HiEdit edit (facts N..2N-1)
  rlsedit-only (the control, ``--runs``) the same, each followed by one more RLSEdit edit of facts N..2N-1:
               whether N more edits of RLSEdit itself cost its first N as much as N HiEdit edits do

and, for each: RLSEdit's Edited Retention (share of its N facts whose target is still the greedy
continuation after the whole stream) and, for the interleaved run, the relative drift of the RLSEdit keys
of the N facts caused by the HiEdit edits (keys read with every edit applied, against the same keys with
the HiEdit edits left out: 0 when HiEdit cannot reach RLSEdit's layers). ``--rls-layers`` and
``--hiedit-layers`` (an untrained HiEdit editor on that spec, a scaled gradient step) put the two on
overlapping layers to see what the server's start-time refusal prevents.

    python bench/editor_overlap.py                       # the served defaults, N = 20
    python bench/editor_overlap.py --n 10 --rls-layers 'down[22-26]'
    python bench/editor_overlap.py --n 40 --runs rlsedit-only

The LAST line printed is JSON with the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import edit_facts, emit, hiedit_home, load_average  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a catalog model (its committed editor and known_facts.json), or a model directory (then "
                        "--hiedit-layers, and the demo split's facts)")
    p.add_argument("--home", default=None, help="where the model is converted and RLSEdit's statistics are cached "
                                                "(default: $HIEDIT_HOME, else hiedit serve's default home)")
    p.add_argument("--n", type=int, default=20, help="RLSEdit edits (and as many HiEdit edits interleaved)")
    p.add_argument("--rls-layers", default=None, help="RLSEdit layer spec (default: its own)")
    p.add_argument("--hiedit-layers", default=None,
                   help="an untrained HiEdit editor on this spec instead of the committed one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="alone,interleaved", help="comma-separated: alone, interleaved, rlsedit-only")
    args = p.parse_args(argv)

    import torch

    from editor_core.catalog import KNOWN_MODELS, resolve_model
    from editor_core.editor import EditRequest
    from editor_core.hiedit import HiEditor
    from editor_core.model import load_model
    from editor_core.rlsedit import RLSEditor
    from editor_core.state import WeightState

    torch.set_num_threads(args.threads)
    home = Path(args.home) if args.home else hiedit_home()
    known = KNOWN_MODELS.get(args.model)
    if known is None and not args.hiedit_layers:
        p.error("--hiedit-layers: needed for a model outside the catalog (it has no committed editor)")
    model, tok = load_model(resolve_model(args.model, home), "float32", "cpu")
    model.eval()
    if args.hiedit_layers:
        hiedit = HiEditor.create(model, tok, args.hiedit_layers)
    else:
        hiedit = HiEditor.load(known.editor, model, tok)
    if known is not None:
        facts = json.loads((known.assets / "known_facts.json").read_text())["facts"]
    else:
        facts = [{**f, "target_new": f["target"]} for f in edit_facts(2 * args.n)]
    rls_facts, hi_facts = facts[:args.n], facts[args.n:2 * args.n]

    def request(f: dict) -> EditRequest:
        return EditRequest(prompt=f["prompt"], target=f["target_new"], subject=f.get("subject"))

    @torch.no_grad()
    def holds(f: dict) -> bool:
        ids = tok(f["prompt"], return_tensors="pt")["input_ids"]
        want = tok(" " + f["target_new"], add_special_tokens=False)["input_ids"]
        out = model.generate(ids, max_new_tokens=len(want), do_sample=False, pad_token_id=tok.eos_token_id)
        return out[0, ids.shape[1]:].tolist() == want

    def run(interleave: bool, second: str = "hiedit") -> dict:
        rls = RLSEditor.create(model, tok, layers=args.rls_layers,
                               cache_dir=str(home / "cache" / "rlsedit-stats"))
        state = WeightState({**{n: rls.module_map[n] for n in rls.modules},
                             **{n: hiedit.module_map[n] for n in hiedit.modules}}, args.model)
        t0, eid, rls_ids, hi_ids, taken = time.perf_counter(), 0, [], [], 0
        for i, f in enumerate(rls_facts):
            eid += 1
            prop = rls.propose(request(f))
            state.apply(eid, prop.delta)
            rls.commit(eid, prop)
            rls_ids.append(eid)
            taken += holds(f)
            if interleave:
                eid += 1
                editor = hiedit if second == "hiedit" else rls
                hprop = editor.propose(request(hi_facts[i]))
                state.apply(eid, hprop.delta)
                editor.commit(eid, hprop)
                hi_ids.append(eid)
            print(f"{'interleaved ' + second if interleave else 'alone'}: {i + 1}/{len(rls_facts)}", file=sys.stderr)
        kept = [holds(f) for f in rls_facts]
        out = {"rlsedit_layers": rls.cfg.layers, "rlsedit_taken_when_made": taken,
               "rlsedit_edited_retention": sum(kept) / len(kept), "rlsedit_kept": sum(kept), "n": len(kept),
               "seconds": round(time.perf_counter() - t0, 1)}
        if interleave:
            out["hiedit_kept" if second == "hiedit" else "rlsedit_second_facts_kept"] = sum(holds(f) for f in hi_facts)
            if second == "hiedit":
                out["key_drift"] = key_drift(rls, state, hi_ids)
        state.reset()
        return out

    @torch.no_grad()
    def key_drift(rls, state, hi_ids: list[int]) -> float:
        """max over facts and layers of ‖k_with − k_without‖ / ‖k_without‖, HiEdit's edits in and out."""
        def keys() -> list[torch.Tensor]:
            got = []
            for f in rls_facts:
                box = {}
                hooks = [rls.module_map[n].register_forward_hook(
                    lambda _m, a, _o, n=n: box.__setitem__(n, a[0][0, -1].float().clone())) for n in rls.modules]
                try:
                    model(**tok(f["prompt"], return_tensors="pt"))
                finally:
                    for h in hooks:
                        h.remove()
                got.extend(box[n] for n in rls.modules)
            return got
        with_hi = keys()
        for i in sorted(hi_ids, reverse=True):
            state.rollback(i)
        without = keys()
        return max(float((a - b).norm() / b.norm()) for a, b in zip(with_hi, without))

    runs = args.runs.split(",")
    out = {"model": args.model, "hiedit_layers": args.hiedit_layers or "committed editor",
           "hiedit_modules": f"{hiedit.modules[0]} .. {hiedit.modules[-1]}", "threads": args.threads,
           "load_average_start": load_average()}
    if "alone" in runs:
        out["alone"] = run(False)
    if "interleaved" in runs:
        out["interleaved"] = run(True)
    if "rlsedit-only" in runs:
        out["rlsedit_only"] = run(True, "rlsedit")
    if "alone" in out and "interleaved" in out:
        out["retention_drop"] = round(out["alone"]["rlsedit_edited_retention"]
                                      - out["interleaved"]["rlsedit_edited_retention"], 4)
    return emit(out)


if __name__ == "__main__":
    main()
