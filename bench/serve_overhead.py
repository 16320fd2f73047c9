"""What the HTTP service costs over calling the model and the engine directly.

Starts ``hiedit serve`` in a subprocess (SQLite, loopback) and, in this process, the same
model plus an in-process :class:`service.engine.EditEngine` on its own SQLite file. Then,
interleaved round by round so that machine load hits both sides alike:

* generation: ``GET /generate?ignore_eos=true`` vs ``model.generate(min_new_tokens=n)`` on the
  same prompt, greedy, exactly the same number of new tokens -> tokens per second of each;
* editing: ``POST /edits`` (wall time at the client) vs ``engine.submit_edit(...).result()``
  (the same pipeline: propose, guard, log, apply, score) on the same fact; both sides roll
  the edit back after each round so every round edits the same weights.

The LAST line printed is JSON with ``ratio_http_generate_to_inprocess`` (target >= 0.85)
and ``ratio_http_edit_to_engine_edit`` (target <= 1.5), medians over the rounds.

    python bench/serve_overhead.py                      # demo assets (or a tiny stand-in if not built)
    python bench/serve_overhead.py --model DIR --editor DIR --rounds 5 --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = "The Eiffel Tower is located in the city of"
FACT = ("The Eiffel Tower is in", "Rome")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _standin(tmp: Path) -> tuple[str, list[str]]:
    """A tiny model and an untrained editor, when the demo assets are not built."""
    from editor_core.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp / "model", "llama", hidden=64, layers=4, intermediate=128)
    return str(model_dir), ["--untrained-editor", "gate[0-3],up[0-3]", "--untrained-lr", "1.0"]


def _editor_settings(args: list[str]) -> dict:
    """The Settings fields for the same editor flags the server gets."""
    out, it = {}, iter(args)
    for flag in it:
        out[flag[2:].replace("-", "_")] = next(it)
    return out


def main(argv: list[str] | None = None) -> int:
    from editor_core.assets import DEMO_HIEDIT, DEMO_MODEL

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--editor", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, the same on both sides (1: an oversubscribed CPU makes OpenMP teams stall)")
    ap.add_argument("--prompt", default=PROMPT)
    args = ap.parse_args(argv)

    import httpx
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="hiedit-bench-"))
    if args.model is None and (DEMO_MODEL / "config.json").is_file() and (DEMO_HIEDIT / "config.json").is_file():
        model_path, editor_args, assets = str(DEMO_MODEL), ["--editor", str(DEMO_HIEDIT)], "demo"
    elif args.model is None:
        model_path, editor_args = _standin(tmp)
        assets = "tiny stand-in (demo assets not built)"
    else:
        model_path, editor_args = args.model, ["--editor", args.editor or "none"]
        assets = model_path
    print(f"assets: {assets}", flush=True)

    port = _free_port()
    server_home = tmp / "server"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--model", model_path, *editor_args, "--home", str(server_home), "--rlsedit", "off",
           "--torch-threads", str(args.threads), "--probe-every-edits", "0", "--probe-every-seconds", "0",
           "--log-level", "warning"]
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # the in-process side: the same model and editor, and an engine on its own database
        from service import db
        from service.engine import EditEngine, EditSpec
        from service.loading import load_all
        from service.metrics import Metrics
        from service.settings import Settings

        settings = Settings(home=tmp / "inproc", model=model_path, rlsedit="off", torch_threads=args.threads,
                            probe_every_edits=0, probe_every_seconds=0, **_editor_settings(editor_args))
        model, tok, editors, unavailable = load_all(settings)
        sql = db.make_engine(settings.resolved_database_url)
        db.upgrade(sql)
        engine = EditEngine(settings, model, tok, editors, unavailable, db.make_sessionmaker(sql), Metrics())
        engine.start().result()

        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError("server exited:\n" + (tmp / "server.log").read_text()[-3000:])
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready")
            time.sleep(0.2)

        ids = tok(args.prompt, return_tensors="pt").input_ids
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
        result = {
            "ratio_http_generate_to_inprocess": round(statistics.median(gen_ratio), 4),
            "ratio_http_edit_to_engine_edit": round(statistics.median(edit_ratio), 4),
            "assets": assets, "rounds": args.rounds, "max_new_tokens": n_new, "threads": args.threads,
            "inproc_tok_s": statistics.median(r["inproc_tok_s"] for r in rows),
            "http_tok_s": statistics.median(r["http_tok_s"] for r in rows),
            "engine_edit_s": statistics.median(r["engine_edit_s"] for r in rows),
            "http_edit_s": statistics.median(r["http_edit_s"] for r in rows),
        }
        engine.stop()
        sql.dispose()
        print(json.dumps(result))
        return 0
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
