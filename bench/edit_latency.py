"""Edit latency of HiEdit against its floor, one forward + backward of the base model.

Three things are timed side by side, interleaved in rotating order so that machine noise
hits them alike, on the same prompt and target:

  floor     one forward + backward of the base model (only the editable weights require grad,
            which is the least any gradient-based editor must do)
  k = L/2   HiEditor.propose + WeightState.apply (HiEdit's setting)
  k = L     the same with every module selected (RLEdit's setting)

Each edit is rolled back (untimed) before the next round, so every round starts from the base.
The last line printed is JSON with ``ratio_edit_to_fwd_bwd`` (p50 of k = L/2 over p50 of the
floor; target <= 2.0 on the tiny model) and ``ratio_k_half_to_k_all`` (target <= 1.0).

    python bench/edit_latency.py                     # demo model and editor if built, else a tiny Llama
    python bench/edit_latency.py --model DIR --editor DIR --rounds 60
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from editor_core.assets import DEMO_HIEDIT, DEMO_MODEL
from editor_core.capture import target_loss, teacher_forced
from editor_core.editor import EditRequest
from editor_core.hiedit import HiEditor
from editor_core.model import load_model, resolve_modules
from editor_core.state import WeightState
from editor_core.tiny import build_tiny_model

PROMPTS = [("The Eiffel Tower is in", "Rome"), ("Danielle Darrieux speaks", "English"),
           ("Toko Yasuda plays the", "piano"), ("The headquarters of BBC is in", "Paris")]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load(args) -> tuple:
    model_dir, editor_dir = args.model, args.editor
    if model_dir is None:
        if (DEMO_MODEL / "config.json").is_file():
            model_dir = DEMO_MODEL
            editor_dir = editor_dir or (DEMO_HIEDIT if (DEMO_HIEDIT / "config.json").is_file() else None)
        else:  # the shape of the demo model (notes/cpu-feasibility.md), randomly initialised
            model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "llama", seed=0,
                                         hidden=192, layers=6, intermediate=512, heads=4, kv_heads=2)
    model, tok = load_model(model_dir, args.dtype)
    if editor_dir:
        editor = HiEditor.load(editor_dir, model, tok)
    else:
        editor = HiEditor.create(model, tok, args.layers, seed=0, lr_init=1e-3)
    return model, tok, editor, str(model_dir), str(editor_dir or "untrained")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir or hub id (default: demo model, else a tiny Llama)")
    ap.add_argument("--editor", help="HiEdit checkpoint dir (default: demo editor, else untrained)")
    ap.add_argument("--layers", default="gate[2-5],up[2-5]", help="layer spec for an untrained editor")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=40, help="timed rounds per variant")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tok, editor, model_name, editor_name = load(args)
    n_modules = len(editor.modules)
    state = WeightState(resolve_modules(model, editor.cfg.layer_spec), "bench")
    k_half, k_all = max(1, n_modules // 2), n_modules

    def floor(prompt, target):
        ex = teacher_forced(tok, prompt, target)
        weights = [m.weight for m in editor.module_map.values()]
        for w in weights:
            w.requires_grad_(True)
        loss = target_loss(model(input_ids=ex.input_ids).logits, ex.labels)
        loss.backward()
        for w in weights:
            w.grad = None
            w.requires_grad_(False)

    def edit(k):
        def run(prompt, target):
            proposal = editor.propose(EditRequest(prompt, target), k=k)
            state.apply(1, proposal.delta)
        return run

    variants = {"floor": floor, "k_half": edit(k_half), "k_all": edit(k_all)}
    times: dict[str, list[float]] = {v: [] for v in variants}
    names = list(variants)
    for r in range(args.warmup + args.rounds):
        prompt, target = PROMPTS[r % len(PROMPTS)]
        for name in names[r % 3:] + names[: r % 3]:  # rotate the order every round
            t0 = time.perf_counter()
            variants[name](prompt, target)
            dt = time.perf_counter() - t0
            if state.active_ids:
                state.rollback(1)
            if r >= args.warmup:
                times[name].append(dt)

    p50 = {v: statistics.median(ts) for v, ts in times.items()}
    p95 = {v: percentile(ts, 0.95) for v, ts in times.items()}
    for v in names:
        print(f"{v:7s} p50 {p50[v] * 1e3:8.2f} ms   p95 {p95[v] * 1e3:8.2f} ms")
    result = {
        "ratio_edit_to_fwd_bwd": round(p50["k_half"] / p50["floor"], 3),
        "ratio_k_half_to_k_all": round(p50["k_half"] / p50["k_all"], 3),
        "p50_ms": {v: round(p50[v] * 1e3, 3) for v in names},
        "p95_ms": {v: round(p95[v] * 1e3, 3) for v in names},
        "k_half": k_half, "k_all": k_all, "rounds": args.rounds,
        "model": model_name, "editor": editor_name, "dtype": args.dtype, "threads": args.threads,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
