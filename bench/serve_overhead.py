"""What the HTTP service costs over calling the model and the engine directly, and what an edit
stream does to generation latency.

Starts ``hiedit serve`` in a subprocess (SQLite, loopback) and, in this process, the same
model plus an in-process :class:`service.engine.EditEngine` on its own SQLite file. Then:

1. interleaved round by round, so that machine load hits both sides alike:

   * generation: ``GET /generate?ignore_eos=true`` vs ``model.generate(min_new_tokens=n)`` on the
     same prompt, greedy, exactly the same number of new tokens -> tokens per second of each;
   * editing: ``POST /edits`` (wall time at the client) vs ``engine.submit_edit(...).result()``
     (the same pipeline: propose, guard, log, apply, score) on the same fact; both sides roll
     the edit back after each round so every round edits the same weights.

2. generation latency while idle against while an edit stream runs, on the server, in alternating
   windows (``--latency-windows`` pairs of ``--latency-window-s`` seconds): one client sends
   ``GET /generate`` back to back (``--latency-tokens`` tokens each) throughout; during the edit
   windows one more client sends ``POST /edits`` back to back (CounterFact facts, the
   bench/load.py driver). p50 and p99 of each, pooled over the windows.

The LAST line printed is JSON with ``ratio_http_generate_to_inprocess`` (target >= 0.85),
``ratio_http_edit_to_engine_edit`` (target <= 1.5), medians over the rounds, and
``ratio_p99_during_edits_to_idle`` (target <= 2.0).

    python bench/serve_overhead.py                      # demo assets (or a tiny stand-in if not built)
    python bench/serve_overhead.py --model DIR --editor DIR --rounds 5 --max-new-tokens 64
    python bench/serve_overhead.py --model DIR --editor DIR --dtype bfloat16 --device cuda   # a GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import QUIET_SERVER, Server, assets, edit_facts, emit, percentile  # noqa: E402
from bench.load import run_load  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"
FACT = ("The Eiffel Tower is in", "Rome")


def latency_under_edits(url: str, windows: int, window_s: float, tokens: int) -> dict:
    """Generation p50/p99 idle vs during a back-to-back edit stream, in alternating windows."""
    idle: list[float] = []
    busy: list[float] = []
    edits, edit_s, errors = 0, 0.0, []
    facts = edit_facts(1000)
    for w in range(windows):
        for phase in (("idle", "edits") if w % 2 == 0 else ("edits", "idle")):
            run = run_load(url, window_s, clients=1, edit_rate=0 if phase == "edits" else -1, max_new_tokens=tokens,
                           facts=facts[w * 100:] + facts[:w * 100], key_prefix=f"latency-{w}")
            (busy if phase == "edits" else idle).extend(run["generate_latencies_s"])
            errors += run["errors"]
            if phase == "edits":
                edits += run["edits"]["sent"]
                edit_s += run["duration_s"]
            print(f"window {w} {phase}: generate p50 {run['generate']['p50_ms']} ms p99 {run['generate']['p99_ms']} ms, "
                  f"{run['edits']['sent']} edits", file=sys.stderr, flush=True)
    if errors:
        raise RuntimeError(f"errors during the latency windows: {errors[:5]}")
    out = {"windows": windows, "window_s": window_s, "tokens": tokens, "requests_idle": len(idle),
           "requests_during_edits": len(busy), "edits_per_s_during": round(edits / edit_s, 3)}
    for name, xs in (("idle", idle), ("during_edits", busy)):
        out[f"generate_p50_ms_{name}"] = round(statistics.median(xs) * 1e3, 2)
        out[f"generate_p99_ms_{name}"] = round(percentile(xs, 0.99) * 1e3, 2)
    out["ratio_p50_during_edits_to_idle"] = round(out["generate_p50_ms_during_edits"] / out["generate_p50_ms_idle"], 3)
    out["ratio_p99_during_edits_to_idle"] = round(out["generate_p99_ms_during_edits"] / out["generate_p99_ms_idle"], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--editor", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, the same on both sides (1: an oversubscribed CPU makes OpenMP teams stall)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--latency-windows", type=int, default=4, help="idle/edit window pairs (0: skip part 2)")
    ap.add_argument("--latency-window-s", type=float, default=10.0)
    ap.add_argument("--latency-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    import httpx
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="hiedit-bench-"))
    a = assets(args.model, args.editor)
    print(f"assets: {a.label}", flush=True)
    server = Server(["--model", a.model, *a.editor_args, "--rlsedit", "off", "--torch-threads", str(args.threads),
                     "--dtype", args.dtype, "--device", args.device, *QUIET_SERVER], tmp / "server")
    server.start()
    try:
        # the in-process side: the same model and editor, and an engine on its own database
        from service import db
        from service.engine import EditEngine, EditSpec
        from service.loading import load_all
        from service.metrics import Metrics
        from service.settings import Settings

        settings = Settings(home=tmp / "inproc", rlsedit="off", torch_threads=args.threads, probe_every_edits=0,
                            probe_every_seconds=0, dtype=args.dtype, device=args.device, **a.settings_fields())
        model, tok, editors, unavailable = load_all(settings)
        sql = db.make_engine(settings.resolved_database_url)
        db.upgrade(sql)
        engine = EditEngine(settings, model, tok, editors, unavailable, db.make_sessionmaker(sql), Metrics())
        engine.start().result()
        client = httpx.Client(base_url=server.url, timeout=600)

        ids = tok(args.prompt, return_tensors="pt").input_ids.to(model.device)
        n_new = args.max_new_tokens

        def inproc_generate() -> tuple[int, float]:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                     temperature=None, top_k=None, top_p=None, attention_mask=torch.ones_like(ids),
                                     pad_token_id=tok.pad_token_id)
            return out.shape[1] - ids.shape[1], time.perf_counter() - t0

        def http_generate() -> tuple[int, float]:
            t0 = time.perf_counter()
            r = client.get("/generate", params={"prompt": args.prompt, "max_new_tokens": n_new, "ignore_eos": "true"})
            dt = time.perf_counter() - t0
            r.raise_for_status()
            return r.json()["tokens"], dt

        spec = EditSpec(prompt=FACT[0], target=FACT[1])

        def engine_edit() -> float:
            t0 = time.perf_counter()
            edit, _ = engine.submit_edit(spec, None, "bench").result()
            dt = time.perf_counter() - t0
            engine.submit_rollback(edit.id).result()
            return dt

        def http_edit() -> float:
            t0 = time.perf_counter()
            r = client.post("/edits", json={"prompt": FACT[0], "target": FACT[1]})
            dt = time.perf_counter() - t0
            if r.status_code != 201:
                raise RuntimeError(f"POST /edits: {r.status_code} {r.text}")
            client.post(f"/edits/{r.json()['id']}/rollback").raise_for_status()
            return dt

        # warm-up of both sides (first calls allocate caches)
        inproc_generate(), http_generate(), engine_edit(), http_edit()
        gen_ratio, edit_ratio, rows = [], [], []
        for i in range(args.rounds):
            order = (0, 1) if i % 2 == 0 else (1, 0)  # alternate who goes first
            g = [None, None]
            for side in order:
                g[side] = inproc_generate() if side == 0 else http_generate()
            e = [None, None]
            for side in order:
                e[side] = engine_edit() if side == 0 else http_edit()
            tps_in, tps_http = g[0][0] / g[0][1], g[1][0] / g[1][1]
            gen_ratio.append(tps_http / tps_in)
            edit_ratio.append(e[1] / e[0])
            rows.append({"round": i, "inproc_tok_s": round(tps_in, 2), "http_tok_s": round(tps_http, 2),
                         "tokens": [g[0][0], g[1][0]], "engine_edit_s": round(e[0], 4), "http_edit_s": round(e[1], 4)})
            print(json.dumps(rows[-1]), flush=True)
        engine.stop()
        sql.dispose()
        result = {
            "ratio_http_generate_to_inprocess": round(statistics.median(gen_ratio), 4),
            "ratio_http_edit_to_engine_edit": round(statistics.median(edit_ratio), 4),
            "assets": a.label, "rounds": args.rounds, "max_new_tokens": n_new, "threads": args.threads,
            "inproc_tok_s": statistics.median(r["inproc_tok_s"] for r in rows),
            "http_tok_s": statistics.median(r["http_tok_s"] for r in rows),
            "engine_edit_s": statistics.median(r["engine_edit_s"] for r in rows),
            "http_edit_s": statistics.median(r["http_edit_s"] for r in rows),
        }
        if args.latency_windows:
            result["latency"] = latency_under_edits(server.url, args.latency_windows, args.latency_window_s,
                                                    args.latency_tokens)
            result["ratio_p99_during_edits_to_idle"] = result["latency"]["ratio_p99_during_edits_to_idle"]
        return emit(result)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
