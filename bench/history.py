"""A long edit log: does an edit cost the same after 1,000 edits as after one, what does each edit
store, how long do a start-up and a rollback take with 1,000 edits in the log, and how much memory.

For each method (default hiedit and rlsedit), through a real ``hiedit serve`` (SQLite, one torch
thread, no background probe reports) on the demo assets:

1. **stream**: ``--edits`` sequential ``POST /edits`` of distinct CounterFact facts (the demo split's
   evaluation stream). Each edit is timed three ways: the server process's CPU time across the request
   (from /proc, immune to other processes time-slicing a shared machine; the figure the ratio uses),
   the client's wall time, and the server's own ``latency_ms``. ``ratio_late_to_early`` = p50 of edits
   N-99..N over p50 of edits 1..100 (target <= 1.2).
2. **stored bytes**: every logged delta (+ the editor's state blob) over the dense bytes of the modules
   it touched (shapes from the model config, in the served dtype), from the log itself.
3. **start-up**: ``--startup-rounds`` interleaved starts of a server on an empty log and on each
   method's log, spawn to ``/readyz`` 200; ``ratio_startup_log_to_empty`` (target <= 1.5).
4. **rollback**: ``--rollbacks`` rollbacks spread over the log on the last started server (wall and
   server CPU); the probe report (retention over every active edit) once, its duration.
5. **memory**: peak resident set (VmHWM) of the stream server and of the replayed server, against the
   model's own bytes (its safetensors files) and the resident set of a bare interpreter that has only
   imported the service (torch + transformers + FastAPI).

The LAST line printed is JSON with all of it.

    python bench/history.py                                   # 1,000 edits per method, ~1.5 h on 2 CPU cores
    python bench/history.py --methods hiedit --edits 300 --window 50
    python bench/history.py --model DIR --editor DIR --dtype bfloat16 --device cuda   # a GPU
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import QUIET_SERVER, REPO, Server, assets, edit_facts, emit, percentile  # noqa: E402

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def dense_bytes(model_dir: Path, dtype: str) -> dict[str, int]:
    """{module suffix: dense bytes} of gate/up/down_proj from the model config (no weights loaded)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    n = cfg["hidden_size"] * cfg["intermediate_size"] * DTYPE_BYTES[dtype]
    return {"gate_proj": n, "up_proj": n, "down_proj": n}


def stored_ratios(db_path: Path, dense: dict[str, int]) -> list[float]:
    """Per logged edit: (delta bytes + state blob bytes) / dense bytes of the modules it touched."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT edit_id, nbytes + COALESCE(LENGTH(state_blob), 0) FROM edit_deltas").fetchall()
        touched: dict[int, int] = {}
        for edit_id, module in con.execute("SELECT edit_id, module FROM edit_layers WHERE selected"):
            touched[edit_id] = touched.get(edit_id, 0) + dense[module.rsplit(".", 1)[-1]]
    finally:
        con.close()
    return [stored / touched[i] for i, stored in rows if touched.get(i)]


def runtime_rss_bytes() -> int:
    """Peak resident set of an interpreter that imported the service and nothing else."""
    code = ("import service.main, editor_core.hiedit, editor_core.rlsedit, pathlib;"
            "print([l for l in pathlib.Path('/proc/self/status').read_text().splitlines()"
            " if l.startswith('VmHWM')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) * 1024


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def stream(server: Server, facts: list[dict], method: str, window: int) -> dict:
    import httpx

    cpu, wall, own = [], [], []
    with httpx.Client(base_url=server.url, timeout=600) as c:
        for i, fact in enumerate(facts):
            c0, t0 = server.cpu_seconds(), time.perf_counter()
            r = c.post("/edits", json={**fact, "method": method})
            wall.append(time.perf_counter() - t0)
            cpu.append(server.cpu_seconds() - c0)
            if r.status_code != 201:
                raise RuntimeError(f"edit {i + 1} ({method}): {r.status_code} {r.text[:300]}")
            own.append(r.json()["latency_ms"] / 1e3)
            if (i + 1) % window == 0:
                print(f"{method}: {i + 1} edits; p50 of the last {window}: cpu {p50(cpu[-window:]) * 1e3:.1f} ms, "
                      f"wall {p50(wall[-window:]) * 1e3:.1f} ms", file=sys.stderr, flush=True)
    out = {"edits": len(facts)}
    for name, xs in (("cpu", cpu), ("wall", wall), ("server", own)):
        early, late = xs[:window], xs[-window:]
        out[f"p50_{name}_ms_early"] = round(p50(early) * 1e3, 2)
        out[f"p50_{name}_ms_late"] = round(p50(late) * 1e3, 2)
        out[f"p95_{name}_ms_early"] = round(percentile(early, 0.95) * 1e3, 2)
        out[f"p95_{name}_ms_late"] = round(percentile(late, 0.95) * 1e3, 2)
        out[f"ratio_{name}_late_to_early"] = round(p50(late) / p50(early), 4)
    out["ratio_late_to_early"] = out["ratio_cpu_late_to_early"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--editor")
    ap.add_argument("--methods", default="hiedit,rlsedit")
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--startup-rounds", type=int, default=3)
    ap.add_argument("--rollbacks", type=int, default=10)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", help="keep the logs and server homes here (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.edits < 2 * args.window:
        ap.error("--edits must be at least 2 x --window")
    a = assets(args.model, args.editor)
    methods = args.methods.split(",")
    root = Path(args.keep or tempfile.mkdtemp(prefix="hiedit-history-"))
    # --rlsedit-overlap allow: the demo's HiEdit layers (2-5) reach RLSEdit's down[3]; each method streams into
    # a log of its own here, so the one's edits never make the other's history stale
    flags = ["--model", a.model, *a.editor_args, "--rlsedit", "on", "--rlsedit-overlap", "allow", "--dtype", args.dtype,
             "--device", args.device, "--torch-threads", str(args.threads), *QUIET_SERVER]
    facts = edit_facts(args.edits)
    dense = dense_bytes(Path(a.model), args.dtype)
    result: dict = {"assets": a.label, "model": a.model, "dtype": args.dtype, "device": args.device,
                    "threads": args.threads, "methods": {}}

    # 1-2: one stream per method, each on its own log
    for method in methods:
        server = Server(flags, root / method)
        first_start = server.start()
        try:
            res = stream(server, facts, method, args.window)
            res["first_start_s"] = round(first_start, 2)
            res["stream_server_peak_rss_bytes"] = server.peak_rss_bytes()
        finally:
            server.stop()
        ratios = stored_ratios(root / method / "hiedit.db", dense)
        res["stored_over_dense_mean"] = round(statistics.mean(ratios), 5)
        res["stored_over_dense_max"] = round(max(ratios), 5)
        result["methods"][method] = res
        print(json.dumps({method: res}), file=sys.stderr, flush=True)

    # 3: start-up, interleaved: an empty log (warmed once: RLSEdit statistics are cached per home) and each log
    homes = {"empty": root / "empty", **{m: root / m for m in methods}}
    warmup = Server(flags, homes["empty"])
    warmup.start()
    warmup.stop()
    startup: dict[str, list[float]] = {h: [] for h in homes}
    last = None
    for r in range(args.startup_rounds):
        order = list(homes)[r % len(homes):] + list(homes)[:r % len(homes)]
        for name in order:
            server = Server(flags, homes[name])
            startup[name].append(server.start())
            if r == args.startup_rounds - 1 and name == methods[-1]:
                last = server  # kept running for the rollbacks
            else:
                server.stop()
    result["startup_s"] = {h: round(p50(ts), 2) for h, ts in startup.items()}
    for m in methods:
        result["methods"][m]["ratio_startup_log_to_empty"] = round(p50(startup[m]) / p50(startup["empty"]), 3)

    # 4-5: rollbacks and the probe report on the replayed log; memory
    import httpx
    try:
        with httpx.Client(base_url=last.url, timeout=600) as c:
            active = [e["id"] for e in c.get("/edits", params={"status": "applied", "limit": 500}).json()["edits"]]
            n_active = c.get("/state").json()["active_edits"]
            step = max(1, len(active) // args.rollbacks)
            walls, cpus = [], []
            for edit_id in active[::step][:args.rollbacks]:
                c0, t0 = last.cpu_seconds(), time.perf_counter()
                r = c.post(f"/edits/{edit_id}/rollback")
                walls.append(time.perf_counter() - t0)
                cpus.append(last.cpu_seconds() - c0)
                assert r.status_code == 200, r.text
            report = c.get("/probes/report", params={"refresh": "true"}).json()
        result["rollback"] = {"method_log": methods[-1], "active_edits": n_active, "n": len(walls),
                              "p50_wall_ms": round(p50(walls) * 1e3, 1), "p95_wall_ms": round(percentile(walls, 0.95) * 1e3, 1),
                              "p50_cpu_ms": round(p50(cpus) * 1e3, 1)}
        result["probe_report_s"] = {"active_edits": report["active_edits"], "duration_s": report["duration_s"]}
        replayed_peak = last.peak_rss_bytes()
    finally:
        last.stop()
    model_bytes = sum(p.stat().st_size for p in Path(a.model).glob("*.safetensors"))
    runtime = runtime_rss_bytes()
    stream_peak = max(result["methods"][m]["stream_server_peak_rss_bytes"] for m in methods)
    result["memory"] = {"model_bytes": model_bytes, "runtime_rss_bytes": runtime,
                        "stream_server_peak_rss_bytes": stream_peak, "replayed_server_peak_rss_bytes": replayed_peak,
                        "peak_over_model": round(stream_peak / model_bytes, 2),
                        "peak_minus_runtime_over_model": round((stream_peak - runtime) / model_bytes, 2)}
    result["logs"] = str(root)
    return emit(result)


if __name__ == "__main__":
    main()
