"""Does an RLSEdit edit cost the same after 1,000 edits as after one?

Runs N sequential RLS updates on one layer-sized random problem (keys shaped like gated MLP
activations, k = silu(x G) ⊙ (x U)) with exactly the operations the editor runs per layer and
edit: F = C Kᵀ, S = I + K F (u × u Cholesky), G = F S⁻¹, C ← C − F S⁻¹ Fᵀ, ΔW_rows = G E.
Each edit's solve is timed on its own (CPU time of the solving thread by default on a CPU, so
that other processes on a shared machine do not skew it; wall time on a GPU); the LAST line
printed is a JSON object with

    ratio_solve_late_to_early = p50(solve ms, edits N-99..N) / p50(solve ms, edits 1..100)

(target: at most 1.2, i.e. no growth with history). The two windows are timed *interleaved*: the
run keeps copies of C before edit 1 and before edit N-99 and, after the N edits, replays both
windows' edits from those copies alternately, so that a change of load on a shared machine
between the start and the end of the run (CPU time too depends on it, through caches and SMT)
hits both windows alike. ``ratio_solve_sequential`` is the same ratio from the first pass. Also
printed: the p50s and p90s, and the drift of the
recursion against the batch closed form C_N = (A_0 + Σ K_iᵀK_i)⁻¹, W_N = C_N B_N at the end.

The solve is a few milliseconds; what an edit really costs is the value optimisation (z) and the
key passes. So the same JSON also carries the *whole* per-edit latency of the editor with its
default settings on the demo model (``--demo-edits``, default 40; 0 skips it): sequential edits of
facts from the demo split's ``editor_train`` stream (never the benchmark stream), each timed from
``propose`` to ``commit`` (WeightState.apply in between), with the share spent optimising z.

    python bench/rlsedit_history.py                      # d_k = 2048, 1,000 edits, CPU float64 + 40 demo edits
    python bench/rlsedit_history.py --d-k 14336 --device cuda --demo-edits 0   # Llama-3-8B width on a GPU
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
from bench.common import load_average  # noqa: E402
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
    ap.add_argument("--demo-edits", type=int, default=40,
                    help="sequential edits of the demo model with the editor's defaults, timed end to end (0: skip)")
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
    c_early = C.clone()                                         # C_0: the early window replays from here
    c_late = None                                               # C_{N-window}: the late window replays from here
    w = torch.zeros(d_k, d_v, dtype=torch.float64, device=dev)       # W*_t in row layout, W_0 = 0
    kv = torch.zeros(d_k, d_v, dtype=torch.float64, device=dev)      # Σ K_iᵀ V_i for the closed-form check
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for t in range(args.edits):
        k, e = keys[t].to(dev), innov[t].to(dev)
        kv += k.T @ (k @ w + e)                                     # V_t = K_t W*_{t-1} + E_t (untimed)
        if t == args.edits - args.window:
            c_late = C.clone()
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

    # Interleaved replay of both windows (same operations, same keys, same starting C as the first pass).
    replay = {"early": ([], []), "late": ([], [])}                # (wall ms, cpu ms)
    running = {"early": c_early, "late": c_late}
    first = {"early": 0, "late": args.edits - args.window}
    for j in range(args.window):
        for name in (("early", "late") if j % 2 == 0 else ("late", "early")):
            k, e = keys[first[name] + j].to(dev), innov[first[name] + j].to(dev)
            sync()
            start, start_cpu = time.perf_counter(), time.thread_time()
            solve(running[name], k, e)
            sync()
            replay[name][0].append((time.perf_counter() - start) * 1e3)
            replay[name][1].append((time.thread_time() - start_cpu) * 1e3)
    if not torch.equal(running["late"], C):                     # the replay redid exactly the late window
        raise RuntimeError("the replay of the late window did not reproduce C_N")

    clock = args.clock if args.clock != "auto" else ("cpu" if dev.type == "cpu" and args.threads == 1 else "wall")
    pick = 1 if clock == "cpu" else 0
    early, late = replay["early"][pick], replay["late"][pick]
    chosen = cpu_ms if clock == "cpu" else times_ms
    p50 = statistics.median
    p90 = lambda xs: statistics.quantiles(xs, n=10)[-1]  # noqa: E731
    result = {
        "edits": args.edits, "window": args.window, "d_k": d_k, "d_v": d_v, "u": u, "dtype": args.dtype,
        "device": str(dev), "threads": args.threads, "clock": clock,
        "p50_solve_ms_early": round(p50(early), 4), "p50_solve_ms_late": round(p50(late), 4),
        "p90_solve_ms_early": round(p90(early), 4), "p90_solve_ms_late": round(p90(late), 4),
        "ratio_solve_late_to_early": round(p50(late) / p50(early), 4),
        "target_ratio_max": 1.2,
        "ratio_solve_sequential": round(p50(chosen[-args.window:]) / p50(chosen[:args.window]), 4),
        "p50_wall_ms_early": round(p50(replay["early"][0]), 4),
        "p50_wall_ms_late": round(p50(replay["late"][0]), 4),
        "ratio_wall_late_to_early": round(p50(replay["late"][0]) / p50(replay["early"][0]), 4),
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
    if args.demo_edits > 0:
        result.update(demo_latency(args.demo_edits, args.seed))
    result["load_average"] = load_average()
    print(json.dumps(result))
    return result


def demo_latency(n: int, seed: int = 0) -> dict:
    """p50 wall ms of a whole RLSEdit edit (propose + apply + commit) on the demo model, default settings.

    Edits the first ``n`` facts of the demo split's editor_train stream one after another. Σ̂ comes
    from the editor's usual on-disk cache (collected on the first run, untimed).
    """
    from editor_core.assets import DEMO_MODEL, DEMO_SPLIT
    from editor_core.data import SHARED_DATA, load_counterfact
    from editor_core.evaluate import request_for
    from editor_core.model import load_model
    from editor_core.rlsedit import RLSEditConfig, RLSEditor
    from editor_core.state import WeightState

    split = json.loads(DEMO_SPLIT.read_text())
    records = {r.case_id: r for r in load_counterfact(SHARED_DATA / split["data"]).records}
    facts = [records[c] for c in split["streams"]["editor_train"][:n]]
    model, tok = load_model(DEMO_MODEL, "float32")
    editor = RLSEditor.create(model, tok, cfg=RLSEditConfig(seed=seed))
    state = WeightState(editor.module_map, "demo")
    z_ms: list[float] = []
    compute_z = editor._compute_z

    def timed_z(*a, **kw):  # the value optimisation alone
        t = time.perf_counter()
        out = compute_z(*a, **kw)
        z_ms.append((time.perf_counter() - t) * 1e3)
        return out

    editor._compute_z = timed_z
    edit_ms, steps = [], []
    for i, rec in enumerate(facts, 1):
        start = time.perf_counter()
        proposal = editor.propose(request_for(rec))
        state.apply(i, proposal.delta)
        editor.commit(i, proposal)
        edit_ms.append((time.perf_counter() - start) * 1e3)
        steps.append(proposal.info["z_steps"])
    half = max(1, n // 2)
    print(f"demo: {n} edits, p50 {statistics.median(edit_ms):.0f} ms, z {statistics.median(z_ms):.0f} ms, "
          f"layers {editor.cfg.layers}, fact token {editor.cfg.fact_token}", file=sys.stderr)
    return {"demo_edits": n, "demo_layers": editor.cfg.layers, "demo_fact_token": editor.cfg.fact_token,
            "p50_edit_ms_demo": round(statistics.median(edit_ms), 1),
            "p90_edit_ms_demo": round(statistics.quantiles(edit_ms, n=10)[-1], 1) if n >= 2 else round(edit_ms[0], 1),
            "p50_value_opt_ms_demo": round(statistics.median(z_ms), 1),
            "value_opt_share_demo": round(sum(z_ms) / sum(edit_ms), 3),
            "mean_z_steps_demo": round(sum(steps) / n, 2),
            "p50_edit_ms_demo_first_half": round(statistics.median(edit_ms[:half]), 1),
            "p50_edit_ms_demo_second_half": round(statistics.median(edit_ms[half:] or edit_ms), 1)}


if __name__ == "__main__":
    main()
