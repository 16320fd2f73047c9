"""What summing the served weights as rank-1 products (service.weights.ServedWeights) costs a replay.

A start replays the log with ``apply_many``: every edit's low-rank delta is added into its modules'
float32 accumulators. ``WeightState`` adds it with ``addmm`` (a GEMM, whose bytes may depend on the thread
count and the BLAS); ``ServedWeights`` adds it as ``rank`` outer products, one elementwise ``mul`` and
``add_`` each, whose bytes do not. This times both on random deltas of a real module shape, in one process,
alternating, and checks that the rank-1 sum gives the same bytes at 1 and 2 threads.

    python bench/served_sum.py                                  # the demo model's gate/up shape, 1,000 edits
    python bench/served_sum.py --shape 1536x576 --edits 200     # SmolLM2-135M's

The LAST line printed is JSON.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import emit, load_average  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="768x192", help="d_out x d_in of one module (default: the demo's gate/up)")
    p.add_argument("--modules", type=int, default=8, help="editable modules; every edit touches --touched of them")
    p.add_argument("--touched", type=int, default=4)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--edits", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    import torch
    from torch import nn

    from editor_core.delta import LowRankDelta
    from editor_core.state import WeightState
    from service.weights import ServedWeights

    torch.set_num_threads(1)
    d_out, d_in = (int(x) for x in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    base = {f"m{i}": torch.randn(d_out, d_in, generator=g) * 0.02 for i in range(args.modules)}
    deltas = []
    for e in range(1, args.edits + 1):
        names = [f"m{(e + j) % args.modules}" for j in range(args.touched)]
        deltas.append((e, LowRankDelta({n: (torch.randn(d_out, args.rank, generator=g) * 1e-3,
                                            torch.randn(args.rank, d_in, generator=g)) for n in names})))

    def replay(cls) -> tuple[float, str]:
        mods = {n: nn.Linear(d_in, d_out, bias=False) for n in base}
        for n, m in mods.items():
            m.weight.data = base[n].clone()
        state = cls(mods, "bench")
        t0 = time.perf_counter()
        state.apply_many(deltas) if hasattr(state, "apply_many") else [state.apply(i, d) for i, d in deltas]
        return time.perf_counter() - t0, state.fingerprint()

    class AddmmBatched(ServedWeights):  # apply_many as the service runs it, with WeightState's addmm
        _accumulate = WeightState._accumulate

    times = {"addmm": [], "rank1": []}
    prints = {}
    for _ in range(args.rounds):
        for label, cls in (("addmm", AddmmBatched), ("rank1", ServedWeights)):
            s, fp = replay(cls)
            times[label].append(s)
            prints[label] = fp
    torch.set_num_threads(2)
    _, rank1_two_threads = replay(ServedWeights)
    best = {k: min(v) for k, v in times.items()}
    return emit({"shape": args.shape, "modules": args.modules, "touched_per_edit": args.touched, "rank": args.rank,
                 "edits": args.edits, "rounds": args.rounds, "replay_s_addmm": round(best["addmm"], 6),
                 "replay_s_rank1": round(best["rank1"], 6),
                 "extra_ms_per_edit": round((best["rank1"] - best["addmm"]) / args.edits * 1000, 3),
                 "rank1_same_bytes_at_1_and_2_threads": prints["rank1"] == rank1_two_threads,
                 "load_average": load_average()})


if __name__ == "__main__":
    main()
