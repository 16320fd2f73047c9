"""The replica's sync in-process, on one SQLite file and no Redis (the polling path): it follows
edits and rollbacks, rebuilds in id order when an older edit comes back, drops failed edits,
refuses writes with 409, and exports its lag."""
from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import update

from conftest import STANDIN_FACTS, app_settings, wait_ready
from service.main import create_app
from service.models import Edit

FACT1, FACT2 = STANDIN_FACTS


def _settings(home: Path, db: str, **kw):
    return app_settings(home, database_url=db, replica_poll_seconds=0.1, **kw)


def _wait_same(writer: TestClient, replica: TestClient, timeout: float = 60.0) -> dict:
    """Poll until the replica serves the writer's state (a bounded wait: the time it took is printed)."""
    t0 = time.monotonic()
    while True:
        w, r = writer.get("/state").json(), replica.get("/state").json()
        if w["fingerprint"] == r["fingerprint"] and r["lag_edits"] == 0:
            print(f"replica caught up after {time.monotonic() - t0:.2f}s")
            return r
        assert time.monotonic() - t0 < timeout, (w, r)
        time.sleep(0.05)


def test_replica_follows_the_log_by_polling(tmp_path, standin_model_dir, standin_editor_dir, standin_components):
    from editor_core.hiedit import HiEditor
    from editor_core.model import load_model

    db = f"sqlite:///{tmp_path / 'log.db'}"
    model, tok = load_model(standin_model_dir)
    replica_components = (model, tok, {"hiedit": HiEditor.load(standin_editor_dir, model, tok)}, {})
    writer_app = create_app(_settings(tmp_path / "w", db), standin_components)
    replica_app = create_app(_settings(tmp_path / "r", db, role="replica", writer_url="http://writer:8000"),
                             replica_components)
    with TestClient(writer_app) as w:
        wait_ready(w)
        with TestClient(replica_app) as r:
            wait_ready(r)
            base = r.get("/state").json()
            assert base["role"] == "replica" and base["lag_edits"] == 0
            ids = []
            for i in range(6):
                fact = (FACT1, FACT2)[i % 2]
                resp = w.post("/edits", json={"prompt": f"{fact.prompt} {i}", "target": fact.target})
                assert resp.status_code == 201, resp.text
                ids.append(resp.json()["id"])
            state = _wait_same(w, r)
            assert state["active_edits"] == 6 and state["fingerprint"] != base["fingerprint"]
            assert "hiedit_replica_lag_edits 0.0" in r.get("/metrics").text
            gen = {"prompt": FACT1.prompt + " 0", "max_new_tokens": 2}
            assert r.get("/generate", params=gen).json() == w.get("/generate", params=gen).json()

            assert w.post(f"/edits/{ids[1]}/rollback").status_code == 200
            assert _wait_same(w, r)["active_edits"] == 5

            # an older edit comes back (e.g. a rollback the writer undid): the replica rebuilds in id
            # order, and ends where a fresh replay of the same log ends
            with writer_app.state.sessions.begin() as s:
                s.execute(update(Edit).where(Edit.id == ids[1]).values(status="applied", rolled_back_at=None))
                s.execute(update(Edit).where(Edit.id == ids[4]).values(status="failed", error="test"))
            t0 = time.monotonic()
            while r.get("/state").json()["active_edits"] != 5 or ids[4] in replica_app.state.engine.state.active_ids:
                assert time.monotonic() - t0 < 60
                time.sleep(0.05)
            print(f"replica rebuilt after {time.monotonic() - t0:.2f}s")
            assert replica_app.state.engine.state.active_ids == [i for i in ids if i != ids[4]]
            replayed = create_app(_settings(tmp_path / "x", db, role="replica"),
                                  (lambda m, t: (m, t, {"hiedit": HiEditor.load(standin_editor_dir, m, t)}, {}))(
                                      *load_model(standin_model_dir)))
            with TestClient(replayed) as fresh:
                wait_ready(fresh)
                assert fresh.get("/state").json()["fingerprint"] == r.get("/state").json()["fingerprint"]

            # writes go to the writer
            for method, path, body in (("POST", "/edits", {"prompt": "a b", "target": "c"}),
                                       ("POST", f"/edits/{ids[0]}/rollback", None),
                                       ("POST", "/probes", {"prompt": "a b"}), ("DELETE", "/probes/1", None)):
                resp = r.request(method, path, json=body)
                assert resp.status_code == 409, (path, resp.text)
                assert resp.json()["detail"] == "this is a replica; send writes to the writer at http://writer:8000"
            # reads work
            assert r.get(f"/edits/{ids[0]}").json()["id"] == ids[0]
            assert r.get("/v1/models").status_code == 200
