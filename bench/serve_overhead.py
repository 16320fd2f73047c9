"""What the HTTP service costs over calling the model and the engine directly, and what a stream of edits
does to generation latency.

Starts ``hiedit serve`` in a subprocess (SQLite, loopback, RLSEdit off) on SmolLM2-135M-Instruct with its
committed HiEdit editor (``--model``/``--editor``: another model), and, in this process, the same model plus
an in-process :class:`service.engine.EditEngine` on its own SQLite file. Then:

1. interleaved round by round, so that machine load hits both sides alike:

   * generation: ``GET /generate?ignore_eos=true`` vs ``model.generate(min_new_tokens=n)`` on the
     same prompt, greedy, exactly the same number of new tokens -> tokens per second of each;
   * editing: ``POST /edits`` (wall time at the client) vs ``engine.submit_edit(...).result()``
     (the same pipeline: propose, take check, log, apply, score) on the same fact (the first of the
     model's facts whose edit the server keeps); both sides roll the edit back after each round so every
     round edits the same weights.

2. generation latency while idle against while edits arrive at ``--edit-rate`` per second, on the server,
   in ``--latency-windows`` pairs of alternating phases (edits first in even pairs, idle first in odd
   ones, so that a drift of the machine's load hits both). One client sends ``GET /generate``
   (``--latency-tokens`` tokens) back to back throughout. An edit phase sends ``POST /edits`` (facts the
   model states, ``known_facts.json``, each to its CounterFact target; the demo split's facts for a model
   outside the catalog) open loop: edit n leaves at n / rate seconds whether or not the earlier ones are
   answered, for ``--latency-window-s`` seconds, so when the single writer is slower than the rate the
   edits queue on it, as they would from many users. The phase lasts until the last of its edits is
   answered: every generation request counted as "during edits" ran while the writer had edits to do.
   An idle phase lasts as long as the last edit phase. The offered rate (edits sent per second of sending)
   and the achieved rate (edits answered per second of the edit phases) are both reported; p50 and p99
   of generation are pooled over the phases of each kind. ``--edit-rate 0``: one edit at a time, back to
   back, instead.

The LAST line printed is JSON with ``ratio_http_generate_to_inprocess`` (target >= 0.85),
``ratio_http_edit_to_engine_edit`` (target <= 1.5), medians over the rounds, and
``ratio_p99_during_edits_to_idle`` (target <= 2.0), with the ``latency`` details and the load averages.

    python bench/serve_overhead.py                      # SmolLM2-135M-Instruct and its editor, 2 edits/s
    python bench/serve_overhead.py --latency-windows 0  # part 1 only
    python bench/serve_overhead.py --model editor_core/assets/demo/model --editor editor_core/assets/demo/hiedit
    python bench/serve_overhead.py --model DIR --editor DIR --dtype bfloat16 --device cuda   # a GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (QUIET_SERVER, SMOLLM2, Server, assets, edit_facts, emit, known_facts,  # noqa: E402
                          load_average, percentile, real_model)
from bench.load import PROMPTS  # noqa: E402

PROMPT = "The Eiffel Tower is located in the city of"


class _Generation:
    """One client sending ``GET /generate`` back to back until ``stop`` is set; its latencies."""

    def __init__(self, url: str, tokens: int):
        self.url, self.tokens = url, tokens
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=600) as c:
            n = 0
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.get("/generate", params={"prompt": PROMPTS[n % len(PROMPTS)],
                                                   "max_new_tokens": self.tokens, "ignore_eos": "true"})
                    if r.status_code == 200:
                        self.latencies.append(time.perf_counter() - t0)
                    else:
                        self.errors.append(f"GET /generate {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.errors.append(f"GET /generate {type(e).__name__}: {e}")
                n += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()  # the request under way finishes and is counted: it started in this phase


def _edit_phase(url: str, window_s: float, rate: float, facts: list[dict], first: int, key: str) -> dict:
    """Send edits for ``window_s`` seconds (open loop at ``rate`` per second; 0: back to back, one at a
    time) and wait for every answer. Returns the per-edit records."""
    import httpx

    records: list[dict] = []
    lock = threading.Lock()
    client = httpx.Client(base_url=url, timeout=1800, limits=httpx.Limits(max_connections=None))

    def post(n: int) -> None:
        fact = facts[(first + n) % len(facts)]
        sent = time.perf_counter()
        try:
            r = client.post("/edits", json=fact, headers={"Idempotency-Key": f"{key}-{n}"})
            status, body = r.status_code, (r.json() if r.headers.get("content-type", "").startswith(
                "application/json") else {})
        except httpx.HTTPError as e:
            status, body = None, {"detail": f"{type(e).__name__}: {e}"}
        with lock:
            records.append({"sent": sent, "answered": time.perf_counter(), "status": status,
                            "server_ms": body.get("latency_ms") if status == 201 else None,
                            "detail": None if status in (201, 422) else str(body.get("detail", body))[:200]})

    t0 = time.perf_counter()
    senders: list[threading.Thread] = []
    n = 0
    try:
        while True:
            if rate > 0:
                due = t0 + n / rate
                if due >= t0 + window_s:
                    break
                time.sleep(max(0.0, due - time.perf_counter()))
                senders.append(threading.Thread(target=post, args=(n,), daemon=True))
                senders[-1].start()
            else:
                if time.perf_counter() >= t0 + window_s:
                    break
                post(n)
            n += 1
        for t in senders:
            t.join()
    finally:
        client.close()
    return {"records": records}


def latency_under_edits(url: str, windows: int, window_s: float, tokens: int, rate: float,
                        facts: list[dict]) -> dict:
    """Generation p50/p99 idle vs while edits arrive at ``rate`` per second, in alternating phases."""
    idle: list[float] = []
    busy: list[float] = []
    edits: list[dict] = []
    errors: list[str] = []
    edit_phase_s, last_edit_phase_s = 0.0, window_s
    pairs = []
    run = uuid.uuid4().hex[:8]
    for w in range(windows):
        pair = {}
        for phase in (("edits", "idle") if w % 2 == 0 else ("idle", "edits")):
            t0 = time.perf_counter()
            with _Generation(url, tokens) as gen:
                if phase == "edits":
                    done = _edit_phase(url, window_s, rate, facts, first=len(edits), key=f"latency-{run}-{w}")
                    edits.extend(done["records"])
                else:
                    time.sleep(last_edit_phase_s)
            elapsed = time.perf_counter() - t0
            if phase == "edits":
                last_edit_phase_s = elapsed
                edit_phase_s += elapsed
                n_edits = len(done["records"])
            (busy if phase == "edits" else idle).extend(gen.latencies)
            errors += gen.errors
            pair[phase] = {"seconds": round(elapsed, 1), "requests": len(gen.latencies),
                           "p99_ms": round(percentile(gen.latencies, 0.99) * 1e3, 1) if gen.latencies else None}
            print(f"pair {w} {phase}: {elapsed:.1f} s, generate p50 "
                  f"{statistics.median(gen.latencies) * 1e3 if gen.latencies else float('nan'):.0f} ms p99 "
                  f"{pair[phase]['p99_ms']} ms over {len(gen.latencies)}"
                  + (f", {n_edits} edits" if phase == "edits" else "") + f", load {load_average()[0]}",
                  file=sys.stderr, flush=True)
        pairs.append(pair)
    errors += [f"POST /edits {e['status']}: {e['detail']}" for e in edits if e["status"] not in (201, 422)]
    if errors:
        raise RuntimeError(f"errors during the latency phases: {errors[:5]}")
    if not idle or not busy:
        raise RuntimeError("a phase had no generation request: lengthen --latency-window-s")
    answered = [e["answered"] - e["sent"] for e in edits]
    server_ms = [e["server_ms"] for e in edits if e["server_ms"] is not None]
    out = {"windows": windows, "window_s": window_s, "tokens": tokens, "requests_idle": len(idle),
           "requests_during_edits": len(busy),
           "edit_rate_offered": rate if rate > 0 else "back to back",
           "edits_sent": len(edits), "edits_kept": sum(e["status"] == 201 for e in edits),
           "edits_refused": sum(e["status"] == 422 for e in edits),
           "edits_per_s_offered": round(len(edits) / (windows * window_s), 3),
           "edits_per_s_achieved": round(len(edits) / edit_phase_s, 3),
           "edit_phase_s": round(edit_phase_s, 1),
           "edit_answer_ms_p50": round(statistics.median(answered) * 1e3, 1),
           "edit_answer_ms_max": round(max(answered) * 1e3, 1),
           "edit_server_ms_p50_kept": round(statistics.median(server_ms), 1) if server_ms else None,
           "pairs": pairs}
    for name, xs in (("idle", idle), ("during_edits", busy)):
        out[f"generate_p50_ms_{name}"] = round(statistics.median(xs) * 1e3, 2)
        out[f"generate_p99_ms_{name}"] = round(percentile(xs, 0.99) * 1e3, 2)
    out["ratio_p50_during_edits_to_idle"] = round(out["generate_p50_ms_during_edits"] / out["generate_p50_ms_idle"], 3)
    out["ratio_p99_during_edits_to_idle"] = round(out["generate_p99_ms_during_edits"] / out["generate_p99_ms_idle"], 3)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"model dir or hub id (default: {SMOLLM2}, converted once "
                                                  "under $HIEDIT_HOME or hiedit serve's default home)")
    ap.add_argument("--editor", default=None, help="HiEdit checkpoint (default: the model's committed one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, the same on both sides (1: an oversubscribed CPU makes OpenMP teams stall)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--latency-windows", type=int, default=4, help="edit/idle phase pairs (0: skip part 2)")
    ap.add_argument("--latency-window-s", type=float, default=5.0, help="seconds of sending edits per edit phase")
    ap.add_argument("--latency-tokens", type=int, default=16)
    ap.add_argument("--edit-rate", type=float, default=2.0,
                    help="edits sent per second in the edit phases, open loop (0: back to back, one at a time)")
    args = ap.parse_args(argv)

    import httpx
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="hiedit-bench-"))
    a = real_model() if args.model is None else assets(args.model, args.editor)
    if args.model is None and args.editor:
        a = dataclasses.replace(a, editor_args=("--editor", args.editor))
    facts = known_facts(a.label) if a.label == SMOLLM2 else edit_facts(1000)
    load_at_start = load_average()
    print(f"assets: {a.label} ({a.model}), load {load_at_start}", file=sys.stderr, flush=True)
    server = Server(["--model", a.model, *a.editor_args, "--rlsedit", "off", "--torch-threads", str(args.threads),
                     "--dtype", args.dtype, "--device", args.device, *QUIET_SERVER], tmp / "server")
    server.start()
    try:
        # the in-process side: the same model and editor, and an engine on its own database
        from service import db
        from service.engine import EditEngine, EditSpec, InvalidEdit
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

        def http_edit(fact: dict) -> tuple[float, bool]:
            """Wall seconds of POST /edits and whether the edit was kept (then rolled back, untimed); a
            refusal (422) runs the same pipeline and changes nothing."""
            t0 = time.perf_counter()
            r = client.post("/edits", json=fact)
            dt = time.perf_counter() - t0
            if r.status_code not in (201, 422):
                raise RuntimeError(f"POST /edits: {r.status_code} {r.text}")
            if r.status_code == 201:
                client.post(f"/edits/{r.json()['id']}/rollback").raise_for_status()
            return dt, r.status_code == 201

        # the fact of part 1: the first whose edit the server keeps (else the first, refused on both sides)
        fact = next((f for f in facts[:10] if http_edit(f)[1]), facts[0])
        spec = EditSpec(prompt=fact["prompt"], target=fact["target"], subject=fact.get("subject"))

        def engine_edit() -> float:
            t0 = time.perf_counter()
            try:
                edit, _ = engine.submit_edit(spec, None, "bench").result()
            except InvalidEdit:
                return time.perf_counter() - t0
            dt = time.perf_counter() - t0
            engine.submit_rollback(edit.id).result()
            return dt

        # warm-up of both sides (first calls allocate caches)
        inproc_generate(), http_generate(), engine_edit(), http_edit(fact)
        gen_ratio, edit_ratio, rows = [], [], []
        for i in range(args.rounds):
            order = (0, 1) if i % 2 == 0 else (1, 0)  # alternate who goes first
            g = [None, None]
            for side in order:
                g[side] = inproc_generate() if side == 0 else http_generate()
            e = [None, None]
            for side in order:
                e[side] = engine_edit() if side == 0 else http_edit(fact)[0]
            tps_in, tps_http = g[0][0] / g[0][1], g[1][0] / g[1][1]
            gen_ratio.append(tps_http / tps_in)
            edit_ratio.append(e[1] / e[0])
            rows.append({"round": i, "inproc_tok_s": round(tps_in, 2), "http_tok_s": round(tps_http, 2),
                         "tokens": [g[0][0], g[1][0]], "engine_edit_s": round(e[0], 4), "http_edit_s": round(e[1], 4)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        engine.stop()
        sql.dispose()
        del model, editors, engine  # the latency phases measure the server alone
        result = {
            "assets": a.label, "model": a.model, "threads": args.threads,
            "load_average_start": load_at_start,
        }
        if rows:
            result.update({
                "ratio_http_generate_to_inprocess": round(statistics.median(gen_ratio), 4),
                "ratio_http_edit_to_engine_edit": round(statistics.median(edit_ratio), 4),
                "rounds": args.rounds, "max_new_tokens": n_new, "edit_prompt": fact["prompt"],
                "inproc_tok_s": statistics.median(r["inproc_tok_s"] for r in rows),
                "http_tok_s": statistics.median(r["http_tok_s"] for r in rows),
                "engine_edit_s": statistics.median(r["engine_edit_s"] for r in rows),
                "http_edit_s": statistics.median(r["http_edit_s"] for r in rows),
            })
        if args.latency_windows:
            result["latency"] = latency_under_edits(server.url, args.latency_windows, args.latency_window_s,
                                                    args.latency_tokens, args.edit_rate, facts)
            result["ratio_p99_during_edits_to_idle"] = result["latency"]["ratio_p99_during_edits_to_idle"]
        result["load_average_end"] = load_average()
        return emit(result)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
