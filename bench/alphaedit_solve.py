"""AlphaEdit's per-layer solve: the public code's closed form against the Woodbury recursion the editor runs.

The closed form solves (P (K_pᵀK_p + KᵀK) + λI) G = P Kᵀ, a d_k × d_k system, for every layer and edit;
``editor_core.alphaedit`` carries M_t = (P K_pᵀK_p + λI)⁻¹ instead and takes one O(d_k² u) step per edit.
This bench runs N sequential edits of one layer-sized random problem (a preserved-key second moment
Σ̂ with decaying spectrum, its null-space projector P, λ = tr(PΣ̂), keys of norm ~ tr Σ̂) and times
both, interleaved edit by edit on the same state so load on a shared machine hits both alike
(CPU time of this thread with ``--threads 1``). The LAST line printed is a JSON object with

    ratio_closed_to_recursive = p50(closed-form solve ms) / p50(recursive step ms)
    drift = max over edits of ‖G_recursive − G_closed‖ / ‖G_closed‖

    python bench/alphaedit_solve.py                 # d_k = 1536 (SmolLM2's down_proj), 200 edits
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
from editor_core.alphaedit import _woodbury, alphaedit_gain, alphaedit_step, null_space_projector  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=200, help="sequential edits (default 200)")
    ap.add_argument("--d-k", type=int, default=1536, help="key width = down_proj inputs (SmolLM2: 1536)")
    ap.add_argument("--null-rel", type=float, default=1e-2, help="null space: eigenvalues below this · λ_max")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: timed in thread CPU time)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.edits < 1 or args.d_k < 2:
        raise SystemExit("--edits must be >= 1 and --d-k >= 2")
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    gen = torch.Generator().manual_seed(args.seed)
    d = args.d_k
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    sigma = basis @ torch.diag(torch.logspace(0, -4, d, dtype=torch.float64)) @ basis.T
    P, null_dim = null_space_projector(sigma, args.null_rel)
    lam = float(torch.trace(P @ sigma))
    M = torch.eye(d, dtype=torch.float64) / lam
    kpkp = torch.zeros(d, d, dtype=torch.float64)
    scale = float(torch.trace(sigma)) ** 0.5 / d ** 0.5
    closed_ms, rec_ms, drift = [], [], 0.0
    for _ in range(args.edits):
        k = torch.randn(1, d, generator=gen, dtype=torch.float64) * scale
        t = clock()
        g_closed = alphaedit_gain(P, kpkp, k, lam)
        closed_ms.append((clock() - t) * 1e3)
        t = clock()
        g_rec = alphaedit_step(M, P, k)
        g, km = _woodbury(M, P, k, +1.0, "bench")  # the commit (the editor's _update_all)
        M.addmm_(g, km, alpha=-1.0)
        rec_ms.append((clock() - t) * 1e3)
        kpkp += k.T @ k
        drift = max(drift, float((g_rec - g_closed).norm() / g_closed.norm()))
    result = {"d_k": d, "null_dim": null_dim, "edits": args.edits, "threads": args.threads,
              "clock": "thread_cpu" if args.threads == 1 else "wall",
              "closed_form_ms_p50": round(statistics.median(closed_ms), 3),
              "recursive_ms_p50": round(statistics.median(rec_ms), 3),
              "ratio_closed_to_recursive": round(statistics.median(closed_ms) / statistics.median(rec_ms), 1),
              "drift": drift}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
