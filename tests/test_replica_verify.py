"""Replicas verify the weights they serve against the fingerprints the writer recorded (service.verify).

- in-process, one SQLite log: a replica that follows edits and rollbacks matches the writer's recorded
  fingerprint of every state it reaches; one whose arithmetic differs stops on the first edit that differs,
  serves the state before it, and says so on /readyz, /state, the log and the metric;
- the served weights' bytes do not depend on the thread count (service.weights.ServedWeights);
- real processes on Postgres + Redis: a writer at one torch thread, replicas at one and two, 50 edits,
  each replica verified on every edit;
- which recorded fingerprint names which state, rollbacks and rows older than migration 0004 included.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import REDIS_URL, REPO, STANDIN_FACTS, ServerProcess, app_settings, wait_ready
from editor_core.delta import LowRankDelta
from service.crud import LogRow
from service.main import create_app
from service.verify import active_digest, edit_states, last_state

FACT1, FACT2 = STANDIN_FACTS
SCHEME = "rank1-v1"


def _metric(text: str, name: str) -> float:
    for fam in text_string_to_metric_families(text):
        if fam.name == name:
            return fam.samples[0].value
    raise AssertionError(f"{name} is not exported")


def _recorded(app, edit_id: int) -> str:
    from service.models import Edit
    with app.state.sessions() as s:
        return s.get(Edit, edit_id).fingerprint_after


def _wait(cond, timeout: float = 60.0, what: str = ""):  # generous: the CI machine is shared
    t0 = time.monotonic()
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.05)


def test_replica_verifies_every_state_and_stops_at_the_first_edit_that_differs(
        tmp_path, standin_model_dir, standin_editor_dir, standin_components):
    from editor_core.hiedit import HiEditor
    from editor_core.model import load_model

    db = f"sqlite:///{tmp_path / 'log.db'}"
    model, tok = load_model(standin_model_dir)
    writer_app = create_app(app_settings(tmp_path / "w", database_url=db), standin_components)
    replica_app = create_app(app_settings(tmp_path / "r", database_url=db, role="replica", replica_poll_seconds=0.1),
                             (model, tok, {"hiedit": HiEditor.load(standin_editor_dir, model, tok)}, {}))
    with TestClient(writer_app) as w:
        wait_ready(w)
        with TestClient(replica_app) as r:
            wait_ready(r)
            ids = []
            for i in range(4):
                fact = (FACT1, FACT2)[i % 2]
                resp = w.post("/edits", json={"prompt": f"{fact.prompt} {i}", "target": fact.target})
                assert resp.status_code == 201, resp.text
                ids.append(resp.json()["id"])
                # verified against the writer's record of exactly this edit
                state = _wait(lambda: (s := r.get("/state").json())["verified"] == f"edit {ids[-1]}" and s,
                              what=f"edit {ids[-1]} not verified")
                assert state["fingerprint"] == _recorded(writer_app, ids[-1]) == resp.json()["fingerprint_after"]
            assert w.post(f"/edits/{ids[1]}/rollback").status_code == 200
            state = _wait(lambda: (s := r.get("/state").json())["verified"] == f"the rollback of edit {ids[1]}" and s)
            assert state["fingerprint"] == w.get("/state").json()["fingerprint"]
            assert r.get("/readyz").status_code == 200
            assert _metric(r.get("/metrics").text, "hiedit_replica_fingerprint_mismatch") == 0

            # From here the replica computes other bytes than the writer for every new edit (as addmm could on
            # another BLAS or thread count): the next edit must be caught, the state before it kept.
            engine = replica_app.state.engine
            before = r.get("/state").json()["fingerprint"]
            honest, seen = engine._load_deltas, set(engine.state.active_ids)

            def off_by_an_ulp(edit_ids):
                return {i: d if i in seen else LowRankDelta({n: (left * (1 + 2 ** -20), right)
                                                             for n, (left, right) in d.factors.items()})
                        for i, d in honest(edit_ids).items()}
            engine._load_deltas = off_by_an_ulp
            resp = w.post("/edits", json={"prompt": FACT1.prompt + " x", "target": FACT1.target})
            assert resp.status_code == 201
            bad_id = resp.json()["id"]
            ready = _wait(lambda: (x := r.get("/readyz")).status_code == 503 and x, what="mismatch not reported")
            body = ready.json()
            assert body["edit_id"] == bad_id and body["event"] == "edit"
            assert body["expected_fingerprint"] == _recorded(writer_app, bad_id) != body["fingerprint"]
            assert f"edit {bad_id}" in body["detail"] and body["fingerprint"] in body["detail"]
            assert _metric(r.get("/metrics").text, "hiedit_replica_fingerprint_mismatch") == 1
            state = r.get("/state").json()
            # serving the last verified state: the writer's state before the edit that differs
            assert state["fingerprint"] == before and bad_id not in replica_app.state.engine.state.active_ids
            assert state["fingerprint_mismatch"]["edit_id"] == bad_id and state["lag_edits"] == 1
            assert r.get("/generate", params={"prompt": FACT1.prompt, "max_new_tokens": 2}).status_code == 200
            # and it stays there: later edits are not applied on top of bytes that cannot be trusted
            assert w.post("/edits", json={"prompt": FACT2.prompt + " y", "target": FACT2.target}).status_code == 201
            _wait(lambda: r.get("/state").json()["lag_edits"] == 2)
            assert r.get("/state").json()["fingerprint"] == before and r.get("/readyz").status_code == 503


def test_a_replica_that_starts_late_checks_the_state_it_catches_up_to(
        tmp_path, standin_model_dir, standin_editor_dir, standin_components):
    """Catch-up at start, the newest state a rollback's: verified when the record is right; when it is not,
    the replica reports the rollback (each edit's own state matched) and keeps the state it built."""
    from sqlalchemy import update

    from editor_core.hiedit import HiEditor
    from editor_core.model import load_model
    from service.models import Edit

    db = f"sqlite:///{tmp_path / 'log.db'}"
    writer_app = create_app(app_settings(tmp_path / "w", database_url=db), standin_components)
    with TestClient(writer_app) as w:
        wait_ready(w)
        ids = [w.post("/edits", json={"prompt": f"{f.prompt} {i}", "target": f.target}).json()["id"]
               for i, f in enumerate((FACT1, FACT2, FACT1))]
        assert w.post(f"/edits/{ids[0]}/rollback").status_code == 200
        writer_fp = w.get("/state").json()["fingerprint"]

    def replica(home):
        model, tok = load_model(standin_model_dir)
        return create_app(app_settings(tmp_path / home, database_url=db, role="replica"),
                          (model, tok, {"hiedit": HiEditor.load(standin_editor_dir, model, tok)}, {}))

    with TestClient(replica("r1")) as r:
        wait_ready(r)
        state = r.get("/state").json()
        assert state["verified"] == f"the rollback of edit {ids[0]}" and state["fingerprint"] == writer_fp

    with writer_app.state.sessions.begin() as s:
        s.execute(update(Edit).where(Edit.id == ids[0]).values(fingerprint_rolled_back="0" * 64))
    with TestClient(replica("r2")) as r:
        # a 503 while the replica still replays is not the answer: wait for the one that names the mismatch
        body = _wait(lambda: (x := r.get("/readyz")).status_code == 503 and "event" in x.json() and x).json()
        assert (body["event"], body["edit_id"], body["expected_fingerprint"]) == ("rollback", ids[0], "0" * 64)
        assert body["fingerprint"] == writer_fp and "unverified" in body["detail"]
        assert r.get("/state").json()["fingerprint"] == writer_fp


def test_served_bytes_do_not_depend_on_the_thread_count(tmp_path):
    """The same deltas summed by ServedWeights at 1 and 2 threads, in two processes: the same sha256."""
    script = r"""
import sys, torch
from torch import nn
from editor_core.delta import LowRankDelta
from service.weights import ServedWeights
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
mods = {f"m{i}": nn.Linear(1536, 576, bias=False) for i in range(2)}
for m in mods.values():
    m.weight.data = torch.randn(576, 1536, generator=g) * 0.02
state = ServedWeights(mods, "x")
for i in range(1, 6):
    state.apply(i, LowRankDelta({n: (torch.randn(576, 10, generator=g) * 0.01, torch.randn(10, 1536, generator=g))
                                 for n in mods}))
state.rollback(2)
print(state.fingerprint())
"""
    got = {t: subprocess.run([sys.executable, "-c", script, str(t)], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip() for t in (1, 2)}
    assert len(got[1]) == 64 and got[1] == got[2], got


def _row(i, status="applied", active=None, fp="", scheme=SCHEME, rb_active=None, fp_rb=""):
    """A LogRow as the writer records it: ``active`` = the edits active after edit i (default 1..i)."""
    active = list(range(1, i + 1)) if active is None else active
    return LogRow(i, status, f"fp{i}" if fp == "" else fp, scheme, active_digest(active),
                  (f"rb{i}" if fp_rb == "" else fp_rb) if rb_active is not None else None,
                  active_digest(rb_active) if rb_active is not None else None)


def test_which_recorded_fingerprint_names_the_current_state():
    rows = [_row(1), _row(2), _row(3, status="failed", fp=None), _row(4, active=[1, 2, 4])]
    assert last_state(rows, [1, 2, 4], SCHEME).fingerprint == "fp4"
    assert set(edit_states(rows, [1, 2, 4], SCHEME)) == {1, 2, 4}
    # edit 2 rolled back after edit 4 was applied: the rollback's state; edit 4's state is not a prefix now
    rows[1] = _row(2, status="rolled_back", rb_active=[1, 4])
    assert (last_state(rows, [1, 4], SCHEME).event, last_state(rows, [1, 4], SCHEME).fingerprint) == ("rollback", "rb2")
    assert set(edit_states(rows, [1, 4], SCHEME)) == {1}
    # rolled back before edit 4 was applied: edit 4's state (without 2) is the current one
    rows[1] = _row(2, status="rolled_back", rb_active=[1])
    rows[3] = _row(4, active=[1, 4])
    assert last_state(rows, [1, 4], SCHEME).fingerprint == "fp4" and set(edit_states(rows, [1, 4], SCHEME)) == {1, 4}
    # a state the writer never had (edit 4 marked failed by a later replay): nothing to compare, and why
    gone = last_state(rows, [1, 5], SCHEME)
    assert gone.fingerprint is None and "no state with exactly these" in gone.why_not
    # not recorded yet, or recorded in another scheme / before migration 0004: nothing to compare, and why
    rows.append(_row(5, active=[1, 4, 5], fp=None))
    assert last_state(rows, [1, 4, 5], SCHEME).fingerprint is None
    assert "not recorded" in last_state(rows, [1, 4, 5], SCHEME).why_not
    rows[-1] = _row(5, active=[1, 4, 5], scheme="addmm")
    assert "another way" in last_state(rows, [1, 4, 5], SCHEME).why_not
    rows[-1] = _row(5, active=[1, 4, 5], scheme=None)
    assert "before migration 0004" in last_state(rows, [1, 4, 5], SCHEME).why_not
    assert last_state([], [], SCHEME) is None


@pytest.mark.postgres
@pytest.mark.redis
def test_replicas_at_one_and_two_threads_match_the_writer_on_each_of_50_edits(
        standin_model_dir, postgres_url, redis_prefix, tmp_path):
    """A wider stand-in (576 x 1536 MLPs, the shape of SmolLM2's) so that BLAS has something to split."""
    from editor_core.hiedit import HiEditor
    from editor_core.model import load_model
    from editor_core.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "wide", "llama", seed=0, hidden=576, layers=2, intermediate=1536,
                                 heads=4, kv_heads=2)
    model, tok = load_model(model_dir)
    editor_dir = HiEditor.create(model, tok, "gate[0-1],up[0-1]", k=2, lr_init=1.0).save(tmp_path / "editor")
    prefix, _ = redis_prefix
    common = ["--model", str(model_dir), "--editor", str(editor_dir), "--rlsedit", "off", "--database-url",
              postgres_url, "--redis-url", REDIS_URL, "--probe-every-edits", "0", "--probe-every-seconds", "0"]
    env = {"HIEDIT_REDIS_PREFIX": prefix, "HIEDIT_REPLICA_POLL_SECONDS": "1", "HIEDIT_API_KEYS": ""}
    servers = []

    def start(*args: str) -> ServerProcess:
        servers.append(ServerProcess([*common, *args], Path(tempfile.mkdtemp(dir=tmp_path)), env))
        return servers[-1].start()

    try:
        writer = start("--role", "writer", "--torch-threads", "1")
        replicas = {t: start("--role", "replica", "--torch-threads", str(t)) for t in (1, 2)}
        for i in range(50):
            fact = (FACT1, FACT2)[i % 2]
            resp = httpx.post(writer.url + "/edits", json={"prompt": f"{fact.prompt} {i}", "target": fact.target},
                              timeout=60)
            assert resp.status_code == 201, resp.text
            edit_id, recorded = resp.json()["id"], resp.json()["fingerprint_after"]
            for threads, replica in replicas.items():
                def verified():
                    s = httpx.get(replica.url + "/state", timeout=10).json()
                    assert s["fingerprint_mismatch"] is None, (threads, s["fingerprint_mismatch"])
                    return s if s["verified"] == f"edit {edit_id}" else None
                state = _wait(verified, 30, f"replica at {threads} threads did not verify edit {edit_id}")
                assert state["fingerprint"] == recorded, (threads, edit_id, state, recorded, httpx.get(
                    writer.url + "/state", timeout=10).json()["fingerprint"], httpx.get(
                    writer.url + f"/edits/{edit_id}", timeout=10).json()["fingerprint_after"])
                assert httpx.get(replica.url + "/readyz", timeout=10).status_code == 200
        for replica in replicas.values():
            metrics = httpx.get(replica.url + "/metrics", timeout=10).text
            assert _metric(metrics, "hiedit_replica_fingerprint_mismatch") == 0
        print(json.dumps({"edits": 50, "replica_threads": sorted(replicas), "all_verified": True}))
    finally:
        for s in servers:
            s.stop()


def test_a_fingerprint_taken_inside_a_trial_leaves_the_fingerprint_after_it_right():
    """WeightState.trial restores each module's digest; one swapped but not yet hashed before the trial must
    stay marked for hashing, or the fingerprint after the trial hashes nothing and is stale."""
    from torch import nn

    from service.weights import ServedWeights

    g = torch.Generator().manual_seed(0)
    mods = {"m": nn.Linear(8, 4, bias=False)}
    state = ServedWeights(mods, "x")
    state.apply(1, LowRankDelta({"m": (torch.randn(4, 2, generator=g), torch.randn(2, 8, generator=g))}))
    with state.trial(LowRankDelta({"m": (torch.randn(4, 1, generator=g), torch.randn(1, 8, generator=g))})):
        state.fingerprint()
    after = state.fingerprint()
    state._dirty.add("m")  # hash from the weight itself
    assert after == state.fingerprint()
