"""Does an RLSEdit edit cost the same after 1,000 edits as after one?

Runs N sequential RLS updates on one layer-sized random problem (keys shaped like gated MLP
activations, k = silu(x G) ⊙ (x U)) with exactly the operations the editor runs per layer and
edit: F = C Kᵀ, S = I + K F (u × u Cholesky), G = F S⁻¹, C ← C − F S⁻¹ Fᵀ, ΔW_rows = G E.
Each edit's solve is timed on its own (CPU time of the solving thread by default on a CPU, so
that other processes on a shared machine do not skew it; wall time on a GPU); the LAST line
printed is a JSON object with

    ratio_solve_late_to_early = p50(solve ms, edits N-99..N) / p50(solve ms, edits 1..100)

(target: at most 1.2, i.e. no growth with history), the p50s and p90s, and the drift of the
recursion against the batch closed form C_N = (A_0 + Σ K_iᵀK_i)⁻¹, W_N = C_N B_N at the end.

    python bench/rlsedit_history.py                      # d_k = 2048, 1,000 edits, CPU float64
    python bench/rlsedit_history.py --d-k 14336 --device cuda   # Llama-3-8B width on a GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from editor_core.rlsedit import apply_correction, check_correction, initial_inverse, rls_gain  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=1000, help="sequential edits (default 1000)")
    ap.add_argument("--window", type=int, default=100, help="edits in the early and the late window (default 100)")
    ap.add_argument("--d-k", type=int, default=2048, help="key width = down_proj inputs (Llama-3-8B: 14336)")
    ap.add_argument("--d-v", type=int, default=512, help="value width = hidden size (Llama-3-8B: 4096)")
    ap.add_argument("--u", type=int, default=1, help="keys per edit (1 = one fact per edit, as the service does)")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="precision of C")
    ap.add_argument("--alpha", type=float, default=1e-2, help="α of A_0 = αI + βwΣ̂")
    ap.add_argument("--weight", type=float, default=None, help="w (default 15000 · d_k / 14336)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = least disturbed by other load)")
    ap.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                    help="what the ratio is measured in: the solving thread's CPU time (immune to other "
                         "processes time-slicing a shared machine; needs --threads 1 on a CPU) or wall time. "
                         "auto = cpu for a 1-thread CPU run, else wall. Both are reported.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", action="store_true", help="skip the O(d_k³) comparison with the batch closed form")
    args = ap.parse_args(argv)
    if args.edits < 2 * args.window:
        ap.error(f"--edits must be at least 2 × --window ({2 * args.window})")
    return args


def gated_keys(n: int, d_k: int, proj: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """n keys shaped like down_proj inputs: silu(x G) ⊙ (x U), x ~ N(0, I) in a narrower hidden space."""
    gate, up = proj
    x = torch.randn(n, gate.shape[0], generator=gen, dtype=torch.float64)
    return torch.nn.functional.silu(x @ gate) * (x @ up)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    d_k, d_v, u = args.d_k, args.d_v, args.u
    d_h = max(64, d_k // 4)
    proj = (torch.randn(d_h, d_k, generator=gen, dtype=torch.float64) / d_h ** 0.5,
            torch.randn(d_h, d_k, generator=gen, dtype=torch.float64) / d_h ** 0.5)
    weight = args.weight if args.weight is not None else 15000.0 * d_k / 14336

    t0 = time.perf_counter()
    k0 = gated_keys(2 * d_k, d_k, proj, gen)
    sigma = k0.T @ k0 / k0.shape[0]                             # Σ̂ = (1/N) Σ k kᵀ
    del k0
    C = initial_inverse(sigma.to(dev), args.alpha, 1.0, weight, dtype)
    keys = gated_keys(args.edits * u, d_k, proj, gen).reshape(args.edits, u, d_k)
    innov = torch.randn(args.edits, u, d_v, generator=gen, dtype=torch.float64) * 0.1
    print(f"setup {time.perf_counter() - t0:.1f}s: d_k={d_k} d_v={d_v} u={u} C {args.dtype} on {dev}",
          file=sys.stderr)

    def solve(C: torch.Tensor, k: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """One edit's RLS work on one layer: gain, Woodbury downdate of C, ΔW_rows = G E."""
        g, m = rls_gain(C, k)
        check_correction(C, m, "bench")
        apply_correction(C, m, -1.0)
        return g @ e.to(g.dtype)

    scratch = C.clone()                                         # warm up BLAS / allocator off the record
    for i in range(3):
        solve(scratch, keys[i].to(dev), innov[i].to(dev))
    del scratch

    times_ms, cpu_ms = [], []
    w = torch.zeros(d_k, d_v, dtype=torch.float64, device=dev)       # W*_t in row layout, W_0 = 0
    kv = torch.zeros(d_k, d_v, dtype=torch.float64, device=dev)      # Σ K_iᵀ V_i for the closed-form check
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for t in range(args.edits):
        k, e = keys[t].to(dev), innov[t].to(dev)
        kv += k.T @ (k @ w + e)                                     # V_t = K_t W*_{t-1} + E_t (untimed)
        sync()
        start, start_cpu = time.perf_counter(), time.thread_time()
        dw = solve(C, k, e)
        sync()
        times_ms.append((time.perf_counter() - start) * 1e3)
        cpu_ms.append((time.thread_time() - start_cpu) * 1e3)
        w += dw.double()
        if (t + 1) % 100 == 0:
            print(f"edit {t + 1}: p50 of the last 100: {statistics.median(times_ms[-100:]):.2f} ms wall, "
                  f"{statistics.median(cpu_ms[-100:]):.2f} ms cpu", file=sys.stderr)

    clock = args.clock if args.clock != "auto" else ("cpu" if dev.type == "cpu" and args.threads == 1 else "wall")
    chosen = cpu_ms if clock == "cpu" else times_ms
    early, late = chosen[:args.window], chosen[-args.window:]
    p50 = statistics.median
    p90 = lambda xs: statistics.quantiles(xs, n=10)[-1]  # noqa: E731
    result = {
        "edits": args.edits, "window": args.window, "d_k": d_k, "d_v": d_v, "u": u, "dtype": args.dtype,
        "device": str(dev), "threads": args.threads, "clock": clock,
        "p50_solve_ms_early": round(p50(early), 4), "p50_solve_ms_late": round(p50(late), 4),
        "p90_solve_ms_early": round(p90(early), 4), "p90_solve_ms_late": round(p90(late), 4),
        "ratio_solve_late_to_early": round(p50(late) / p50(early), 4),
        "target_ratio_max": 1.2,
        "p50_wall_ms_early": round(p50(times_ms[:args.window]), 4),
        "p50_wall_ms_late": round(p50(times_ms[-args.window:]), 4),
        "ratio_wall_late_to_early": round(p50(times_ms[-args.window:]) / p50(times_ms[:args.window]), 4),
        "total_solve_wall_s": round(sum(times_ms) / 1e3, 3),
    }
    if not args.no_check:
        # Batch closed form (W_0 = 0): A_N = A_0 + Σ K_iᵀK_i, C_N = A_N⁻¹, W_N = C_N Σ K_iᵀ V_i.
        a = weight * sigma.to(dev)
        a.diagonal().add_(args.alpha)
        kk = keys.reshape(-1, d_k).to(dev)
        a += kk.T @ kk
        c_batch = torch.linalg.inv(a)
        w_batch = torch.linalg.solve(a, kv)
        result["c_max_rel_err_vs_batch"] = float((C.double() - c_batch).abs().max() / c_batch.abs().max())
        result["w_max_rel_err_vs_batch"] = float((w - w_batch).abs().max() / w_batch.abs().max())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
