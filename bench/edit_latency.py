"""Edit latency of every method against its floor, one forward + backward of the base model,
and the bytes each method's edit stores against the dense bytes of the modules it touches.

Side by side, interleaved in rotating order so that machine noise hits them alike, on the same
facts (CounterFact, the demo split's evaluation stream):

  floor        one forward + backward of the base model on the fact (only the HiEdit modules require
               grad): the least any gradient-based editor must do
  <method>     one edit as the service makes it: ``editor.propose`` + ``WeightState.apply`` +
               ``editor.commit``, for every method of ``editor_core.baselines.METHODS`` (hiedit k = L/2,
               rledit k = L, mend, ft, random-k, gradnorm-k, rlsedit, memit-nohist)

Each edit is undone (rollback + ``editor.forget``, untimed) before the next, so every round starts
from the base weights. Stored bytes = the logged delta (``LowRankDelta.to_bytes``) plus the
editor's state blob (RLSEdit's keys), over the dense bytes of the modules the delta touches.

The LAST line printed is JSON: ``ratio_to_floor`` {method: {p50, p95}} (each p50 over the floor's
p50, p95 over p95), ``ratio_edit_to_fwd_bwd`` (hiedit's p50 ratio; target <= 2.0),
``ratio_k_half_to_k_all`` (hiedit k = L/2 over rledit k = L, the same nets on every module;
target <= 1.0), ``stored_over_dense`` {method: ratio}, and the milliseconds.

    python bench/edit_latency.py                                  # demo assets, every method
    python bench/edit_latency.py --methods hiedit,rledit --rounds 60
    python bench/edit_latency.py --model DIR --editor DIR --dtype bfloat16 --device cuda   # a GPU

``mend`` has no committed checkpoint: unless ``--mend DIR`` is given it is trained here for
``--mend-train-facts`` facts, one trajectory, one epoch (cached under ``--cache-dir``). Its latency depends
on its architecture (the rledit nets on every module), not on how well it is trained.

The default is the demo model: every method runs in a few minutes there. SmolLM2-135M-Instruct has no
committed RLEdit or MEND checkpoint (both would be trained first) and its RLSEdit-family edits take seconds
each; its HiEdit edit against the same floor, through the service, is ``bench/edit_cost.py``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import edit_facts, emit, load_average, percentile  # noqa: E402
from editor_core.assets import DEMO_HIEDIT, DEMO_MODEL, DEMO_RLEDIT, DEMO_SPLIT  # noqa: E402
from editor_core.baselines import METHODS, MethodContext, default_methods  # noqa: E402
from editor_core.capture import target_loss, teacher_forced  # noqa: E402
from editor_core.editor import EditRequest  # noqa: E402
from editor_core.model import load_model, model_id  # noqa: E402
from editor_core.state import WeightState  # noqa: E402


def train_records(n: int):
    """The first ``n`` facts of the demo split's editor-training stream (never the evaluation stream)."""
    import json

    from editor_core.data import SHARED_DATA, load_counterfact

    split = json.loads(DEMO_SPLIT.read_text())
    records = {r.case_id: r for r in load_counterfact(SHARED_DATA / split["data"]).records}
    return [records[c] for c in split["streams"]["editor_train"][:n]]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO_MODEL), help="model dir or hub id (default: the demo model)")
    ap.add_argument("--editor", default=str(DEMO_HIEDIT), help="HiEdit checkpoint (default: the demo editor)")
    ap.add_argument("--rledit", default=str(DEMO_RLEDIT), help="RLEdit checkpoint (default: the demo one)")
    ap.add_argument("--mend", default=None, help="MEND-style checkpoint (default: trained here, see above)")
    ap.add_argument("--mend-train-facts", type=int, default=20,
                    help="facts the MEND editor is trained on, one trajectory, one epoch (default %(default)s)")
    ap.add_argument("--methods", default=None, help="comma-separated (default: every method but 'pre')")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: an oversubscribed CPU makes OpenMP teams stall)")
    ap.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "hiedit-bench-cache"),
                    help="trained baselines and RLSEdit statistics are cached here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tok = load_model(args.model, args.dtype, args.device)
    methods = args.methods.split(",") if args.methods else [m for m in default_methods() if m != "pre"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; known: {sorted(METHODS)}")
    ctx = MethodContext(model, tok, Path(args.editor), rledit_dir=Path(args.rledit) if args.rledit else None,
                        mend_dir=Path(args.mend) if args.mend else None, cache_dir=Path(args.cache_dir),
                        train_records=train_records(args.mend_train_facts) if "mend" in methods and not args.mend
                        else [],
                        # one trajectory of all the training facts: the trainer otherwise takes the HiEdit
                        # editor's traj_len (30 for the demo editor since a0d4ad3), more facts than the
                        # default 20, and refuses to train (TrainConfigError); the latency of a MEND edit
                        # depends on the nets' architecture, not on how they were trained
                        train_options={"epochs": 1, "traj_len": args.mend_train_facts}, progress=False)
    editors = {}
    for m in methods:
        t0 = time.perf_counter()
        editors[m] = METHODS[m](ctx)  # (editor, k)
        print(f"{m}: ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    wanted = {n for editor, _ in editors.values() for n in editor.modules}
    modules = {n: mod for n, mod in model.named_modules() if n in wanted}
    state = WeightState(modules, model_id(model))
    floor_weights = [m.weight for m in ctx.hiedit().module_map.values()]
    facts = edit_facts(8)
    dense_bytes = {n: mod.weight.numel() * mod.weight.element_size() for n, mod in modules.items()}

    def floor(fact):
        ex = teacher_forced(tok, fact["prompt"], fact["target"])
        for w in floor_weights:
            w.requires_grad_(True)
        try:
            loss = target_loss(model(input_ids=ex.input_ids.to(model.device)).logits, ex.labels.to(model.device))
            loss.backward()
        finally:
            for w in floor_weights:
                w.grad = None
                w.requires_grad_(False)

    stored: dict[str, list[float]] = {m: [] for m in methods}

    def edit(method):
        editor, k = editors[method]

        def run(fact):
            request = EditRequest(fact["prompt"], fact["target"], subject=fact.get("subject"))
            proposal = editor.propose(request, k)
            state.apply(1, proposal.delta)
            editor.commit(1, proposal)
            return proposal
        return run

    variants = {"floor": floor, **{m: edit(m) for m in methods}}
    names = list(variants)
    times: dict[str, list[float]] = {v: [] for v in names}
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    for r in range(args.warmup + args.rounds):
        fact = facts[r % len(facts)]
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order every round
            sync()
            t0 = time.perf_counter()
            proposal = variants[name](fact)
            sync()
            dt = time.perf_counter() - t0
            if name != "floor":
                touched = sum(dense_bytes[n] for n in proposal.delta.modules)
                if touched:
                    blob = len(proposal.delta.to_bytes()) + len(proposal.state_blob or b"")
                    stored[name].append(blob / touched)
                if state.active_ids:
                    state.rollback(1)
                editors[name][0].forget(1, proposal.state_blob)
            if r >= args.warmup:
                times[name].append(dt)
        if r == args.warmup - 1 or (r + 1) % 10 == 0:
            print(f"round {r + 1}", file=sys.stderr, flush=True)

    p50 = {v: statistics.median(ts) for v, ts in times.items()}
    p95 = {v: percentile(ts, 0.95) for v, ts in times.items()}
    for v in names:
        print(f"{v:13s} p50 {p50[v] * 1e3:9.2f} ms   p95 {p95[v] * 1e3:9.2f} ms   "
              f"x floor {p50[v] / p50['floor']:7.3f}", flush=True)
    result = {
        "ratio_to_floor": {m: {"p50": round(p50[m] / p50["floor"], 3), "p95": round(p95[m] / p95["floor"], 3)}
                           for m in methods},
        "stored_over_dense": {m: round(statistics.mean(s), 5) if s else None for m, s in stored.items()},
        "p50_ms": {v: round(p50[v] * 1e3, 3) for v in names},
        "p95_ms": {v: round(p95[v] * 1e3, 3) for v in names},
        "k": {m: k for m, (_, k) in editors.items()},
        "rounds": args.rounds, "model": args.model, "editor": args.editor, "dtype": args.dtype,
        "device": args.device, "threads": args.threads, "load_average": load_average(),
    }
    if "hiedit" in methods:
        result["ratio_edit_to_fwd_bwd"] = result["ratio_to_floor"]["hiedit"]["p50"]
        if "rledit" in methods:
            result["ratio_k_half_to_k_all"] = round(p50["hiedit"] / p50["rledit"], 3)
    return emit(result)


if __name__ == "__main__":
    main()
