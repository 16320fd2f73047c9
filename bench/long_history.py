"""A 10,000-edit history on a real model: does an edit cost the same at 10,000 as at 1, does the server's
memory stay flat, and how long do a start-up and a rollback take with 10,000 edits in the log.

One ``hiedit serve`` (SQLite, one torch thread, no background probe reports) on ``OUT/home``:

1. **stream**: ``--edits`` sequential ``POST /edits`` of the first ``--edits`` CounterFact records of
   ``--data`` (distinct facts; counterfact-edit.json holds 10,000). Each is timed by the server process's
   CPU time across the request (from /proc: immune to other processes time-slicing a shared machine; the
   figure the ratio uses), the client's wall time and the server's own ``latency_ms``;
   ``ratio_late_to_early`` = p50 of the last ``--window`` edits over p50 of the first ``--window``
   (issue 20's target: <= 1.2). The server's resident set (VmRSS) is read before the first edit and after
   every ``--rss-every`` edits; ``ratio_rss_end_to_start`` = at the last edit over at 0 (target <= 1.5).
   ``--edit-check`` is the server's HIEDIT_EDIT_CHECK for the whole stream; the default ``off`` times the
   edit path without the take check (its scoring passes and strengthening steps), whose cost depends on
   whether the model still takes edits, not on the history: with the HiEdit editor SmolLM2 collapses well
   before 10,000 edits (docs/results.md), and a checked stream would measure that instead.
2. **start-up**: ``--startup-rounds`` interleaved starts on an empty log and on the stream's log (with the
   weight checkpoints its server wrote, as a restarted writer has them), spawn to ``/readyz`` 200;
   ``ratio_startup_log_to_empty`` (target <= 3). Then one start of the same log without its checkpoints
   (what a replica with a fresh home does: every delta read and added from W^0).
3. **rollback** on the started log server: the newest edit, the one ``--window`` before it, and the one in
   the middle of the log (wall and server CPU). A rollback re-adds, from the newest checkpoint older than
   the edit, every later active delta that touches the same modules: the older the edit, the longer.

``--real R`` (R < ``--edits``): only the first R edits are real ``POST /edits`` (the latency ratio is then
edits R-window+1..R over 1..window); the log is then grown to ``--edits`` by copying those R edits' rows
(their deltas and RLSEdit keys: the real shapes and bytes, not new facts), and the resident set is read
after a start on the log of ``--rss-every`` and of ``--edits`` edits instead of during the stream. For RLSEdit, whose
value optimisation costs seconds an edit on SmolLM2, as issue 20 allows for its memory and start-up.

Resumable: per-edit timings go to ``OUT/timings.jsonl`` as they are measured; a rerun with the same
``--out`` continues the stream where it stopped (its server replays the log first). The LAST line printed
is JSON with all of it.

    python bench/long_history.py --model <converted SmolLM2 dir> \\
        --editor editor_core/assets/smollm2-135m-instruct/hiedit --edits 10000 --out runs/history-10k
    python bench/long_history.py --edits 300 --window 50 --out /tmp/h      # the tiny stand-in, minutes
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import QUIET_SERVER, Server, assets, emit, percentile, process_memory  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "counterfact" / "counterfact-edit.json"


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def facts(path: Path, n: int) -> list[dict]:
    """The first ``n`` CounterFact records of ``path`` as edit requests (distinct facts, in file order)."""
    from editor_core.data import load_counterfact

    records = load_counterfact(path, limit=n).records
    if len(records) < n:
        raise SystemExit(f"--data {path}: {len(records)} usable records, --edits asks for {n}")
    return [{"prompt": r.prompt, "target": r.target_new, **({"subject": r.subject} if r.subject else {})}
            for r in records]


def rss(server: Server) -> int:
    return process_memory(server.proc.pid)["VmRSS"]


def stream(server: Server, todo: list[dict], done: int, total: int, method: str, timings: Path,
           rss_every: int) -> None:
    """POST /edits of ``todo`` (edits done+1..), one JSON line per edit appended to ``timings``."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=600) as c, timings.open("a") as out:
        if done == 0:
            out.write(json.dumps({"i": 0, "rss": rss(server)}) + "\n")
        t_start = time.perf_counter()
        for j, fact in enumerate(todo):
            i = done + j + 1
            c0, t0 = server.cpu_seconds(), time.perf_counter()
            r = c.post("/edits", json={**fact, "method": method})
            row = {"i": i, "wall": time.perf_counter() - t0, "cpu": server.cpu_seconds() - c0, "status": r.status_code}
            if r.status_code == 201:
                row["server"] = r.json()["latency_ms"] / 1e3
            elif r.status_code != 422:  # a refusal (the guard's norm bound) is a result; anything else is not
                raise RuntimeError(f"edit {i}: {r.status_code} {r.text[:300]}")
            if i % rss_every == 0 or i == total:
                row["rss"] = rss(server)
            out.write(json.dumps(row) + "\n")
            out.flush()
            if i % 100 == 0:
                rate = (j + 1) / (time.perf_counter() - t_start)
                print(f"{i}/{total} edits, {rate:.2f}/s, last cpu {row['cpu'] * 1e3:.0f} ms", file=sys.stderr, flush=True)


def fill_by_copy(db: Path, total: int) -> int:
    """Grow the SQLite log at ``db`` to ``total`` applied edits by copying its applied edits' rows (edit,
    layers, delta and state blob) in id order, cycling; returns how many rows were added."""
    import sqlite3

    con = sqlite3.connect(db)
    try:
        templates = [r[0] for r in con.execute("SELECT id FROM edits WHERE status = 'applied' ORDER BY id")]
        have = len(templates)
        cols = {t: [r[1] for r in con.execute(f"PRAGMA table_info({t})")] for t in ("edits", "edit_layers", "edit_deltas")}
        edit_cols = [f'"{c}"' for c in cols["edits"] if c not in ("id", "idempotency_key")]
        layer_cols = [f'"{c}"' for c in cols["edit_layers"] if c not in ("id", "edit_id")]
        delta_cols = [f'"{c}"' for c in cols["edit_deltas"] if c not in ("id", "edit_id")]
        for k in range(have, total):
            src = templates[k % have]
            cur = con.execute(f"INSERT INTO edits ({', '.join(edit_cols)}) SELECT {', '.join(edit_cols)} "
                              "FROM edits WHERE id = ?", (src,))
            new = cur.lastrowid
            con.execute(f"INSERT INTO edit_layers (edit_id, {', '.join(layer_cols)}) SELECT ?, "
                        f"{', '.join(layer_cols)} FROM edit_layers WHERE edit_id = ?", (new, src))
            con.execute(f"INSERT INTO edit_deltas (edit_id, {', '.join(delta_cols)}) SELECT ?, "
                        f"{', '.join(delta_cols)} FROM edit_deltas WHERE edit_id = ?", (new, src))
        con.commit()
        return max(0, total - have)
    finally:
        con.close()


def summarise(rows: list[dict], window: int) -> dict:
    edits = [r for r in rows if r["i"] > 0]
    kept = [r for r in edits if r["status"] == 201]
    out: dict = {"edits": len(edits), "applied": len(kept), "refused": len(edits) - len(kept)}
    early = [r for r in kept if r["i"] <= window]
    late = [r for r in kept if r["i"] > max(r["i"] for r in edits) - window]
    for name in ("cpu", "wall", "server"):
        e, la = [r[name] for r in early], [r[name] for r in late]
        out[f"p50_{name}_ms_early"] = round(p50(e) * 1e3, 1)
        out[f"p50_{name}_ms_late"] = round(p50(la) * 1e3, 1)
        out[f"p95_{name}_ms_late"] = round(percentile(la, 0.95) * 1e3, 1)
        out[f"ratio_{name}_late_to_early"] = round(p50(la) / p50(e), 3)
    out["ratio_late_to_early"] = out["ratio_cpu_late_to_early"]
    marks = {r["i"]: r["rss"] for r in rows if "rss" in r}
    out["rss_bytes"] = {str(i): b for i, b in sorted(marks.items())}
    out["ratio_rss_end_to_start"] = round(marks[max(marks)] / marks[0], 3)
    return out


def home_with_shared_stats(home: Path, shared: Path) -> Path:
    """``home`` whose RLSEdit statistics cache is ``shared`` (collected once, not once per home)."""
    (home / "cache").mkdir(parents=True, exist_ok=True)
    shared.mkdir(parents=True, exist_ok=True)
    link = home / "cache" / "rlsedit-stats"
    if not link.exists():
        link.symlink_to(shared.resolve(), target_is_directory=True)
    return home


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the demo model, else a tiny stand-in)")
    ap.add_argument("--editor", help="HiEdit editor directory for --model")
    ap.add_argument("--method", default="hiedit", help="edit method of the stream (default hiedit)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CounterFact JSON of the stream")
    ap.add_argument("--edits", type=int, default=10000)
    ap.add_argument("--real", type=int, help="only the first R edits real, the rest copies of them (see above)")
    ap.add_argument("--window", type=int, default=100, help="edits in the early and the late window")
    ap.add_argument("--rss-every", type=int, default=1000, help="read the server's resident set every N edits")
    ap.add_argument("--edit-check", choices=["off", "report", "refuse"], default="off",
                    help="HIEDIT_EDIT_CHECK of the stream's server (default off: see above)")
    ap.add_argument("--startup-rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="logs, homes and timings (a rerun resumes here)")
    args = ap.parse_args(argv)
    if args.edits < 2 * args.window:
        ap.error("--edits must be at least 2 x --window")
    a = assets(args.model, args.editor)
    editor = ["--editor", "none", "--rlsedit", "on"] if args.method == "rlsedit" else [*a.editor_args, "--rlsedit", "off"]
    flags = ["--model", a.model, *editor, "--torch-threads", str(args.threads), *QUIET_SERVER]
    real = args.real or args.edits
    if real < 2 * args.window or real > args.edits:
        ap.error("--real must be at least 2 x --window and at most --edits")
    env = {"HIEDIT_EDIT_CHECK": args.edit_check}
    args.out.mkdir(parents=True, exist_ok=True)
    stats = args.out / "rlsedit-stats"
    home, timings = home_with_shared_stats(args.out / "home", stats), args.out / "timings.jsonl"
    stream_facts = facts(args.data, real)
    rows = [json.loads(line) for line in timings.read_text().splitlines()] if timings.exists() else []
    done = max((r["i"] for r in rows), default=0)
    result: dict = {"assets": a.label, "model": a.model, "method": args.method, "edit_check": args.edit_check,
                    "threads": args.threads, "data": str(args.data), "out": str(args.out),
                    "load_average_start": os.getloadavg()}

    # 1: the stream (resumed where a previous run stopped)
    if done < real:
        server = Server(flags, home, env)
        result["stream_start_s"] = round(server.start(timeout=3600), 2)  # a first RLSEdit start collects statistics
        try:
            stream(server, stream_facts[done:], done, real, args.method, timings, args.rss_every)
            result["stream_peak_rss_bytes"] = server.peak_rss_bytes()
        finally:
            server.stop()  # writes the weight checkpoint and editor snapshots, as a graceful stop does
        rows = [json.loads(line) for line in timings.read_text().splitlines()]
    result["stream"] = summarise(rows, args.window)
    print(json.dumps(result["stream"]), file=sys.stderr, flush=True)

    # 1b (--real): the log grown by copies; the resident set after a start at each size
    if real < args.edits:
        sizes = sorted({n for n in (args.rss_every, args.edits) if n > real})  # each size costs a start
        after_start = {}
        for n in sizes:
            fill_by_copy(home / "hiedit.db", n)
            server = Server(flags, home, env)
            server.start()
            after_start[str(n)] = rss(server)
            server.stop()
            print(json.dumps({"rss_after_start": {str(n): after_start[str(n)]}}), file=sys.stderr, flush=True)
        empty = Server(flags, home_with_shared_stats(args.out / "empty", stats), env)
        empty.start()
        after_start["0"] = rss(empty)
        empty.stop()
        result["copied_to"] = args.edits
        result["rss_bytes_after_start"] = dict(sorted(after_start.items(), key=lambda kv: int(kv[0])))
        result["ratio_rss_after_start_end_to_empty"] = round(after_start[str(args.edits)] / after_start["0"], 3)

    # 2: start-up, interleaved with an empty log; then once without the checkpoints
    homes = {"empty": home_with_shared_stats(args.out / "empty", stats), "log": home}
    warm = Server(flags, homes["empty"], env)
    warm.start()
    warm.stop()
    startup: dict[str, list[float]] = {h: [] for h in homes}
    last = None
    for r in range(args.startup_rounds):
        for name in (["empty", "log"] if r % 2 == 0 else ["log", "empty"]):
            server = Server(flags, homes[name], env)
            startup[name].append(server.start())
            if r == args.startup_rounds - 1 and name == "log" and last is None:
                last = server
            else:
                server.stop()
    if last is None:
        last = Server(flags, home, env)
        last.start()
    result["startup_s"] = {h: round(p50(ts), 2) for h, ts in startup.items()}
    result["ratio_startup_log_to_empty"] = round(p50(startup["log"]) / p50(startup["empty"]), 3)

    # 3: rollbacks on the started log server
    import httpx

    try:
        result["rss_bytes_started_log"] = rss(last)
        with httpx.Client(base_url=last.url, timeout=3600) as c:
            n_active = c.get("/state").json()["active_edits"]
            ids = [e["id"] for e in c.get("/edits", params={"status": "applied", "limit": 500}).json()["edits"]]
            newest = max(ids)
            picks = {"newest": newest, f"newest_minus_{args.window}": newest - args.window,
                     "middle": newest // 2}
            rollbacks = {}
            for label, edit_id in picks.items():
                c0, t0 = last.cpu_seconds(), time.perf_counter()
                r = c.post(f"/edits/{edit_id}/rollback")
                rollbacks[label] = {"edit_id": edit_id, "status": r.status_code,
                                    "wall_s": round(time.perf_counter() - t0, 3),
                                    "cpu_s": round(last.cpu_seconds() - c0, 3)}
                print(json.dumps({label: rollbacks[label]}), file=sys.stderr, flush=True)
        result["rollback"] = {"active_edits": n_active, **rollbacks}
        result["rss_bytes_after_rollbacks"] = rss(last)
    finally:
        last.stop()

    # 2b: a start without checkpoints (a fresh replica's home replays every delta from W^0)
    weights, aside = home / "state" / "weights", home / "state" / "weights.aside"
    if weights.exists():
        weights.rename(aside)
    try:
        cold = Server(flags, home, env)
        result["startup_s"]["log_without_checkpoints"] = round(cold.start(), 2)
        cold.stop()
    finally:
        shutil.rmtree(weights, ignore_errors=True)
        if aside.exists():
            aside.rename(weights)
    result["load_average_end"] = os.getloadavg()
    return emit(result)


if __name__ == "__main__":
    main()
