"""Load on a running server: N generation clients and an edit stream at the same time, and every error counted.

Each generation client sends ``GET /generate`` back to back; one edit client sends ``POST /edits``
(each with its own Idempotency-Key) at ``--edit-rate`` per second on a fixed schedule, one edit in
flight at a time: an edit that takes longer than 1 / rate delays the next, so ``edits.rate_per_s`` is
the rate the server took, which is below ``edit_rate`` when its single writer is slower (``0``: back to
back, as fast as the writer takes them; a negative rate: no edits). The facts are those the model states
(its ``known_facts.json``, each to its CounterFact target) for a catalog model, else the demo split's.
Every answer that is not the documented success (200 / 201, or a 422 refusal of an edit that did not
take, counted as ``refused``) and every transport error or timeout is an error. The LAST line printed
is JSON::

    {"duration_s", "generate": {"requests", "errors", "p50_ms", "p99_ms", "tokens_per_s"},
     "edits": {"sent", "acknowledged", "refused", "errors", "p50_ms", "p99_ms", "rate_per_s"},
     "errors": [first 20], "total_errors", "load_average", ...}

    python bench/load.py                     # starts `hiedit serve` on SmolLM2-135M-Instruct and its editor
    python bench/load.py --url http://127.0.0.1:8000 --duration 120 --clients 16 --edit-rate 2
    python bench/load.py --model editor_core/assets/demo/model --editor editor_core/assets/demo/hiedit

``run_load`` is what ``tests/test_reliability_faults.py`` calls.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (QUIET_SERVER, SMOLLM2, Assets, Server, assets, edit_facts, emit, known_facts,  # noqa: E402
                          load_average, percentile, real_model)

PROMPTS = ("The Eiffel Tower is located in the city of", "The mother tongue of Danielle Darrieux is",
           "Toko Yasuda plays the", "The headquarters of the BBC are in")


@dataclass
class _Log:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    acknowledged: list[int] = field(default_factory=list)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self, duration: float, kind: str) -> dict:
        lat = self.latencies
        out = {"requests" if kind == "generate" else "sent": self.requests, "errors": len(self.errors),
               "p50_ms": round(statistics.median(lat) * 1e3, 2) if lat else None,
               "p99_ms": round(percentile(lat, 0.99) * 1e3, 2) if lat else None}
        if kind == "generate":
            out["tokens_per_s"] = round(self.tokens / duration, 2)
        else:
            out["acknowledged"] = len(self.acknowledged)
            out["refused"] = self.refused
            out["rate_per_s"] = round(self.requests / duration, 3)
        return out


def run_load(url: str, duration: float, clients: int = 16, edit_rate: float = 2.0, max_new_tokens: int = 16,
             facts: list[dict] | None = None, headers: dict | None = None, timeout: float = 120.0,
             key_prefix: str = "load") -> dict:
    """Drive ``url`` for ``duration`` seconds; returns the summary (see the module docstring) plus
    ``acknowledged_ids`` (the edits answered 201) and ``generate_latencies_s`` (every successful one).

    ``facts``: the edit requests, sent in order and cycled (default: the demo split's stream).
    ``key_prefix``: the Idempotency-Keys are ``<key_prefix>-<n>``; runs against one log need their own.
    """
    import httpx

    gen, edits = _Log(), _Log()
    stop_at = time.monotonic() + duration
    facts = facts if facts is not None else (edit_facts(1000) if edit_rate >= 0 else [])

    def generator(i: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout, headers=headers) as c:
            n = 0
            while time.monotonic() < stop_at:
                prompt = PROMPTS[(i + n) % len(PROMPTS)]
                n += 1
                t0 = time.perf_counter()
                try:
                    r = c.get("/generate", params={"prompt": prompt, "max_new_tokens": max_new_tokens,
                                                   "ignore_eos": "true"})
                    ok, why = r.status_code == 200, f"GET /generate {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, why = False, f"GET /generate {type(e).__name__}: {e}"
                dt = time.perf_counter() - t0
                with gen.lock:
                    gen.requests += 1
                    if ok:
                        gen.latencies.append(dt)
                        gen.tokens += r.json()["tokens"]
                    else:
                        gen.errors.append(why)

    def editor() -> None:
        with httpx.Client(base_url=url, timeout=timeout, headers=headers) as c:
            t_start, n = time.monotonic(), 0
            while time.monotonic() < stop_at:
                if edit_rate > 0:  # fixed schedule: edit n is due at t_start + n / rate
                    wait = t_start + n / edit_rate - time.monotonic()
                    if wait > 0:
                        time.sleep(min(wait, max(0.0, stop_at - time.monotonic())))
                        if time.monotonic() >= stop_at:
                            break
                fact = facts[n % len(facts)]
                key = f"{key_prefix}-{n}"
                n += 1
                t0 = time.perf_counter()
                try:
                    r = c.post("/edits", json=fact, headers={"Idempotency-Key": key})
                    ok, why = r.status_code == 201, f"POST /edits {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, why = False, f"POST /edits {type(e).__name__}: {e}"
                dt = time.perf_counter() - t0
                edits.requests += 1
                if ok:
                    edits.latencies.append(dt)
                    edits.acknowledged.append(r.json()["id"])
                elif why.startswith("POST /edits 422"):  # refused: did not take, nothing applied (docs/api.md)
                    edits.latencies.append(dt)
                    edits.refused += 1
                else:
                    edits.errors.append(why)

    threads = [threading.Thread(target=generator, args=(i,), daemon=True) for i in range(clients)]
    if edit_rate >= 0 and facts:
        threads.append(threading.Thread(target=editor, daemon=True))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    return {"duration_s": round(elapsed, 2), "clients": clients, "edit_rate": edit_rate,
            "max_new_tokens": max_new_tokens, "generate": gen.summary(elapsed, "generate"),
            "edits": edits.summary(elapsed, "edits"), "acknowledged_ids": edits.acknowledged,
            "generate_latencies_s": gen.latencies, "errors": (gen.errors + edits.errors)[:20]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start `hiedit serve` on --model)")
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--clients", type=int, default=16, help="concurrent generation clients")
    ap.add_argument("--edit-rate", type=float, default=2.0, help="edits per second (0: back to back, <0: none)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server it starts")
    ap.add_argument("--model", help=f"model of the server it starts (default: {SMOLLM2}, converted once under "
                                    "$HIEDIT_HOME or hiedit serve's default home)")
    ap.add_argument("--editor", help="HiEdit checkpoint of the server it starts (default: the model's committed one)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    server = None
    url = args.url
    facts = None
    load_at_start = load_average()
    if url is None:
        a = real_model() if args.model is None else assets(args.model, args.editor)
        if args.model is None and args.editor:
            a = Assets(a.label, a.model, ("--editor", args.editor))
        server = Server(["--model", a.model, *a.editor_args, "--rlsedit", "off", "--torch-threads",
                         str(args.threads), "--dtype", args.dtype, "--device", args.device, *QUIET_SERVER],
                        Path(tempfile.mkdtemp(prefix="hiedit-load-")))
        server.start()
        url = server.url
    try:
        if facts is None:  # a running server: the facts its model states, when it is a catalog model
            import httpx

            from editor_core.catalog import KNOWN_MODELS

            try:
                name = httpx.get(url + "/state", timeout=30).json().get("model")
            except (httpx.HTTPError, ValueError):
                name = None
            facts = known_facts(name) if name in KNOWN_MODELS else None
        result = run_load(url, args.duration, args.clients, args.edit_rate, args.max_new_tokens, facts=facts)
        if server is not None:
            result["server_peak_rss_bytes"] = server.peak_rss_bytes()
    finally:
        if server is not None:
            server.stop()
    result.pop("acknowledged_ids")
    result.pop("generate_latencies_s")
    result["total_errors"] = result["generate"]["errors"] + result["edits"]["errors"]
    result["load_average_start"], result["load_average_end"] = load_at_start, load_average()
    return emit(result)


if __name__ == "__main__":
    main()
