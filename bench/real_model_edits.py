"""Real-model edits through the HTTP API: N facts the served model states, each edited to its
CounterFact counterfactual, then every edit rolled back -- against a running ``hiedit serve`` (``--url``),
or, without ``--url``, against one it starts on SmolLM2-135M-Instruct with its committed editor and the
serving defaults (``--edit-check refuse``; RLSEdit off and no background probe reports, which HiEdit edits
do not use; the model converted once under ``$HIEDIT_HOME`` or ``hiedit serve``'s default home).

The facts come from the model's ``known_facts.json`` (``scripts/known_facts.py``: the CounterFact
facts whose greedy continuation starts with the true object). N are taken in file order, those whose
neighbourhood fact the model also states (``neighbour_stated``) first, so that "the neighbour answer is
kept" is measured on neighbours the model gets right; the rest fill up when there are too few. The
chosen facts are edited in file order, one after another, all staying applied:

  before   GET /generate (max_new_tokens 8) of every chosen prompt and locality prompt: the base answers
  per fact GET /generate on the prompt and the locality prompt (the answers just before this edit), then
           POST /edits {"prompt", "target": target_new, "rephrases": [rephrase_prompt],
                        "locality": [{"prompt": locality_prompt, "target": locality_ground_truth}]}
           (a 4xx is a refusal: not taken; a 429 is waited out and retried), then GET /generate again:
           taken  = the prompt's continuation, leading whitespace stripped, starts with target_new
           kept   = the locality prompt's continuation is identical to the one before the edit
  at end   taken_at_end: the prompts still answering their new target with all N edits applied
  rollback POST /edits/{id}/rollback for every applied edit, newest first; then GET /state's
           fingerprint must equal the one read at the start, and every prompt's (and locality prompt's)
           greedy continuation must be its base answer again

A progress line per fact goes to stderr. The LAST line printed on stdout is JSON::

    {"model", "n", "taken", "refused", "neighbour_kept", "rollback_restores_fingerprint",
     "answers_restored", "edit_latency_ms_p50", "edit_latency_ms_p90", "refusals": [{case_id, status, detail}],
     "applied", "errors", "taken_at_end", "neighbour_answers_restored", "base_matches_known_facts", ...}

Edit latencies are the client-side wall time of the accepted POSTs (``server_latency_ms_p50`` is the
server's own figure; ``attempt_latency_ms_p50`` counts refused attempts too). Exit status 0 whatever the figures are (a measurement); 2 on a usage or
connection error (unreachable server, missing facts file, bad API key), after rolling back what it
applied where it still can.

    python bench/real_model_edits.py                                   # starts hiedit serve on SmolLM2, 50 facts
    hiedit serve --model gemma-3-270m --rlsedit off &                  # a server of your own
    python bench/real_model_edits.py --url http://127.0.0.1:8000 --n 20
    python bench/real_model_edits.py --url http://127.0.0.1:8765 --n 3 --timeout 120
    HIEDIT_API_KEY=alice-key-0002 python bench/real_model_edits.py --facts editor_core/assets/gemma-3-270m/known_facts.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO, emit, load_average, percentile  # noqa: E402

MAX_NEW_TOKENS = 8
SELECTION = ("first N facts of known_facts.json in file order, those with neighbour_stated true first (the "
             "others fill up when there are too few), edited in file order")


class BenchError(Exception):
    """A usage or connection problem: the message is printed and the exit status is 2."""


# ---- pure helpers ----------------------------------------------------------------------------------------

def starts_with_target(continuation: str, target: str) -> bool:
    """The continuation, leading whitespace stripped, starts with the whole target (stripped)."""
    target = target.strip()
    return bool(target) and continuation.lstrip().startswith(target)


def choose_facts(facts: list[dict], n: int) -> list[dict]:
    """``n`` facts, neighbour_stated ones first, returned in file order."""
    indexed = list(enumerate(facts))
    ranked = [p for p in indexed if p[1].get("neighbour_stated")] + [p for p in indexed if not p[1].get("neighbour_stated")]
    return [f for _, f in sorted(ranked[:max(n, 0)], key=lambda p: p[0])]


def edit_body(fact: dict) -> dict:
    """The POST /edits request of one fact (service/schemas.py EditIn)."""
    return {"prompt": fact["prompt"], "target": fact["target_new"], "rephrases": [fact["rephrase_prompt"]],
            "locality": [{"prompt": fact["locality_prompt"], "target": fact["locality_ground_truth"]}]}


def default_facts_path(model: str) -> Path:
    return REPO / "editor_core" / "assets" / model / "known_facts.json"


def auth_headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _ms(xs: list[float], q: float) -> float | None:
    return round(percentile(xs, q) * 1e3, 1) if xs else None


def summarize(model: str, rows: list[dict], base_fingerprint: str, final_fingerprint: str | None,
              restored: list[bool], neighbour_restored: list[bool], **extra) -> dict:
    """The JSON figures of a run from its per-fact rows.

    A row: {case_id, status, applied, taken, kept, taken_at_end, latency_s, server_latency_ms, detail,
    base_matches}; ``status`` is the POST's HTTP status (None: no answer). A 4xx is a refusal; an answer
    that is neither a 2xx "applied" edit nor a 4xx is an error.
    """
    applied = [r for r in rows if r["applied"]]
    refused = [r for r in rows if r["status"] is not None and 400 <= r["status"] < 500]
    errors = [r for r in rows if not r["applied"] and r not in refused]
    latencies = [r["latency_s"] for r in applied]
    server_ms = [r["server_latency_ms"] for r in applied if r.get("server_latency_ms") is not None]
    return {
        "model": model, "n": len(rows),
        "taken": sum(bool(r["taken"]) for r in rows),
        "refused": len(refused),
        "neighbour_kept": sum(bool(r["kept"]) for r in applied),
        "rollback_restores_fingerprint": final_fingerprint is not None and final_fingerprint == base_fingerprint,
        "answers_restored": sum(restored),
        "edit_latency_ms_p50": _ms(latencies, 0.5), "edit_latency_ms_p90": _ms(latencies, 0.9),
        "refusals": [{"case_id": r["case_id"], "status": r["status"], "detail": r["detail"]} for r in refused],
        "applied": len(applied),
        "errors": [{"case_id": r["case_id"], "status": r["status"], "detail": r["detail"]} for r in errors],
        "taken_rate": round(sum(bool(r["taken"]) for r in rows) / len(rows), 4) if rows else None,
        "neighbour_kept_rate": round(sum(bool(r["kept"]) for r in applied) / len(applied), 4) if applied else None,
        "taken_at_end": sum(bool(r.get("taken_at_end")) for r in applied),
        "neighbour_answers_restored": sum(neighbour_restored),
        "base_matches_known_facts": sum(bool(r.get("base_matches")) for r in rows),
        "server_latency_ms_p50": round(statistics.median(server_ms), 1) if server_ms else None,
        "attempt_latency_ms_p50": _ms([r["latency_s"] for r in rows if r["status"] is not None], 0.5),
        "base_fingerprint": base_fingerprint, "final_fingerprint": final_fingerprint,
        **extra,
    }


# ---- the run ---------------------------------------------------------------------------------------------

def _detail(resp) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)[:300]


def _get(client, path: str, **params):
    import httpx

    try:
        resp = client.get(path, params=params or None)
    except httpx.HTTPError as e:
        raise BenchError(f"GET {path}: {type(e).__name__}: {e}") from None
    if resp.status_code in (401, 403):
        raise BenchError(f"GET {path}: {resp.status_code} {_detail(resp)} (pass a key with --api-key or "
                         "HIEDIT_API_KEY)")
    if resp.status_code != 200:
        raise BenchError(f"GET {path}: {resp.status_code} {_detail(resp)}")
    return resp.json()


def generate(client, prompt: str) -> str:
    return _get(client, "/generate", prompt=prompt, max_new_tokens=MAX_NEW_TOKENS)["text"]


def post_edit(client, body: dict, key: str, retries: int = 5):
    """POST /edits with an Idempotency-Key (a retry after a timeout cannot apply the edit twice);
    429s are waited out. Returns (response, wall seconds of the answered try)."""
    import httpx

    last = None
    for _ in range(retries):
        t0 = time.perf_counter()
        try:
            resp = client.post("/edits", json=body, headers={"Idempotency-Key": key})
        except httpx.TimeoutException as e:
            last = e
            continue
        except httpx.HTTPError as e:
            raise BenchError(f"POST /edits: {type(e).__name__}: {e}") from None
        if resp.status_code == 429:
            time.sleep(float(resp.headers.get("Retry-After", "1") or 1))
            continue
        if resp.status_code in (401, 403):
            raise BenchError(f"POST /edits: {resp.status_code} {_detail(resp)} (the key needs the 'edit' scope: "
                             "--api-key or HIEDIT_API_KEY)")
        return resp, time.perf_counter() - t0
    raise BenchError(f"POST /edits: no answer after {retries} tries ({last or 'rate limited'}); raise --timeout")


def rollback_all(client, edit_ids: list[int]) -> list[dict]:
    """Roll back ``edit_ids`` newest first; the failures."""
    import httpx

    failures = []
    for eid in reversed(edit_ids):
        try:
            resp = client.post(f"/edits/{eid}/rollback")
        except httpx.HTTPError as e:
            failures.append({"edit_id": eid, "status": None, "detail": f"{type(e).__name__}: {e}"})
            continue
        if resp.status_code != 200:
            failures.append({"edit_id": eid, "status": resp.status_code, "detail": _detail(resp)})
    return failures


def run(client, facts: list[dict], model: str, log=print) -> dict:
    """Edit ``facts`` through ``client`` (an httpx.Client on the server), roll back, and summarize."""
    t_start = time.perf_counter()
    state = _get(client, "/state")
    base_fp = state["fingerprint"]
    run_id = uuid.uuid4().hex[:8]
    base = {i: (generate(client, f["prompt"]), generate(client, f["locality_prompt"])) for i, f in enumerate(facts)}
    rows, applied_ids = [], []
    try:
        for i, fact in enumerate(facts):
            before_prompt, before_loc = generate(client, fact["prompt"]), generate(client, fact["locality_prompt"])
            resp, seconds = post_edit(client, edit_body(fact), f"bench-real-{run_id}-{i}-{fact['case_id']}")
            body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
            ok = resp.status_code in (200, 201) and body.get("status") == "applied"
            row = {"case_id": fact["case_id"], "status": resp.status_code, "applied": ok, "latency_s": seconds,
                   "server_latency_ms": body.get("latency_ms") if ok else None,
                   "detail": None if ok else (body.get("detail") or body.get("error") or body.get("status")
                                              or resp.text[:300]),
                   "edit_id": body.get("id") if ok else None, "before": before_prompt, "before_locality": before_loc,
                   "base_matches": base[i][0] == fact.get("greedy", {}).get("prompt"),
                   "taken": False, "kept": True, "after": None, "after_locality": None,
                   "server_take": ((body.get("efficacy") or {}).get("take") if ok else None)}
            if ok:
                applied_ids.append(body["id"])
                row["after"] = generate(client, fact["prompt"])
                row["after_locality"] = generate(client, fact["locality_prompt"])
                row["taken"] = starts_with_target(row["after"], fact["target_new"])
                row["kept"] = row["after_locality"] == before_loc
            rows.append(row)
            what = (f"applied in {seconds:.1f}s: {row['after']!r} taken={'yes' if row['taken'] else 'no'}, "
                    f"neighbour {'kept' if row['kept'] else 'changed: ' + repr(row['after_locality'])}"
                    if ok else f"NOT applied ({resp.status_code}: {row['detail']})")
            log(f"[{i + 1}/{len(facts)}] case {fact['case_id']} {fact['prompt']!r} {before_prompt!r} -> "
                f"{fact['target_new']!r}: {what}")
        for fact, row in zip(facts, rows):
            if row["applied"]:
                row["taken_at_end"] = starts_with_target(generate(client, fact["prompt"]), fact["target_new"])
    except BenchError as e:
        failures = rollback_all(client, applied_ids)
        left = [f["edit_id"] for f in failures]
        raise BenchError(f"{e}; rolled back {len(applied_ids) - len(left)} of the {len(applied_ids)} applied "
                         f"edits" + (f", still applied: {left}" if left else "")) from None
    failures = rollback_all(client, applied_ids)
    final_fp = _get(client, "/state")["fingerprint"]
    restored, neighbour_restored = [], []
    for i, fact in enumerate(facts):
        restored.append(generate(client, fact["prompt"]) == base[i][0])
        neighbour_restored.append(generate(client, fact["locality_prompt"]) == base[i][1])
    log(f"rolled back {len(applied_ids) - len(failures)} of {len(applied_ids)} edits; fingerprint "
        f"{'restored' if final_fp == base_fp else 'DIFFERS'}; prompts restored {sum(restored)}/{len(facts)}")
    return summarize(model, rows, base_fp, final_fp, restored, neighbour_restored,
                     rollback_failures=failures, seconds=round(time.perf_counter() - t_start, 1),
                     per_fact=[{k: r[k] for k in ("case_id", "status", "edit_id", "taken", "kept", "before",
                                                  "after", "before_locality", "after_locality", "server_take")} for r in rows])


def load_facts(path: Path, n: int) -> tuple[list[dict], dict]:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BenchError(f"no facts file {path}: make it with `python scripts/known_facts.py <model dir>` or "
                         "pass --facts") from None
    except ValueError as e:
        raise BenchError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("facts"), list):
        raise BenchError(f"{path}: not a known_facts.json (no 'facts' list)")
    return choose_facts(doc["facts"], n), doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="base URL of a running server (default: start hiedit serve on "
                                                "SmolLM2-135M-Instruct, see above)")
    ap.add_argument("--api-key", default=os.environ.get("HIEDIT_API_KEY"),
                    help="sent as 'Authorization: Bearer <key>' (default: $HIEDIT_API_KEY); needs the 'edit' scope")
    ap.add_argument("--n", type=int, default=50, help="facts to edit (default %(default)s)")
    ap.add_argument("--facts", default=None, help="known_facts.json (default: editor_core/assets/<model>/"
                                                  "known_facts.json, <model> from GET /state)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds per request (default %(default)s; an edit takes up to ~30 s on a CPU)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be at least 1")
    import httpx

    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    server = None
    if args.url is None:
        import tempfile

        from bench.common import QUIET_SERVER, Server, real_model

        a = real_model()
        server = Server(["--model", a.model, *a.editor_args, "--rlsedit", "off", *QUIET_SERVER],
                        Path(tempfile.mkdtemp(prefix="hiedit-real-edits-")))
        log(f"starting hiedit serve on {a.model} ...")
        server.start()
        args.url = server.url
    load_at_start = load_average()
    try:
        with httpx.Client(base_url=args.url.rstrip("/"), timeout=args.timeout,
                          headers=auth_headers(args.api_key)) as client:
            model = _get(client, "/state").get("model", "")
            path = Path(args.facts) if args.facts else default_facts_path(model)
            facts, doc = load_facts(path, args.n)
            if not facts:
                raise BenchError(f"{path}: no facts")
            if doc.get("model") and doc["model"] != model:
                log(f"warning: {path} lists facts of {doc['model']!r}, the server serves {model!r}")
            chosen_stated = sum(bool(f.get("neighbour_stated")) for f in facts)
            log(f"{model}: editing {len(facts)} facts of {path} ({chosen_stated} with the neighbour stated) at "
                f"{args.url}")
            result = run(client, facts, model, log)
    except BenchError as e:
        print(f"real_model_edits.py: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    result.update(n_requested=args.n, facts_file=str(path), selection=SELECTION,
                  neighbour_stated_chosen=chosen_stated, url=args.url, load_average_start=load_at_start,
                  load_average_end=load_average())
    emit({**{k: v for k, v in result.items() if k != "per_fact"}, "per_fact": result["per_fact"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
