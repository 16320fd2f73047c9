"""edits.status is constrained (migration 0004): the upgrade refuses a log with another value and names the
rows, the database refuses new ones, and a writer does not start on such a log. SQLite and Postgres."""
from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from conftest import app_settings
from service import db
from service.main import create_app

ROW = ("INSERT INTO edits (status, method, model, prompt, target, rephrases, locality, k, actor, created_at, info) "
       "VALUES (:status, 'hiedit', 'tiny', 'p', 't', '[]', '[]', 1, 'me', CURRENT_TIMESTAMP, '{}')")


def test_upgrade_refuses_unknown_statuses_and_the_constraint_keeps_them_out(database_url):
    engine = db.make_engine(database_url)
    try:
        db.upgrade(engine, "0003")
        with engine.begin() as conn:
            conn.execute(text(ROW), {"status": "applied"})
            conn.execute(text(ROW), {"status": "aplied"})
        with pytest.raises(RuntimeError, match=r"edit 2: 'aplied'.*nothing was changed"):
            db.upgrade(engine)
        with engine.connect() as conn:  # still at 0003, the row as it was
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"
        with engine.begin() as conn:
            conn.execute(text("UPDATE edits SET status = 'applied' WHERE id = 2"))
        db.upgrade(engine)
        with pytest.raises(IntegrityError, match="ck_edits_status"):
            with engine.begin() as conn:
                conn.execute(text(ROW), {"status": "done"})
        db.downgrade(engine, "0003")  # and the downgrade drops the constraint again
        with engine.begin() as conn:
            conn.execute(text(ROW), {"status": "done"})
    finally:
        db.downgrade(engine)
        engine.dispose()


def test_writer_does_not_start_on_a_log_with_an_unknown_status(tmp_path, standin_components):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    engine = db.make_engine(url)
    db.upgrade(engine, "0003")
    with engine.begin() as conn:
        conn.execute(text(ROW), {"status": "pending"})
    engine.dispose()
    app = create_app(app_settings(tmp_path, database_url=url), standin_components)
    with pytest.raises(RuntimeError):
        with TestClient(app):
            pass
    assert "edit 1: 'pending'" in app.state.startup_failure
    assert app.state.startup_failure.startswith("migrating the edit log failed")


def test_writer_refuses_a_migrated_log_whose_constraint_was_bypassed(tmp_path, standin_components):
    """SQLite can be told to ignore CHECK constraints: the replay's own check names the row."""
    from editor_core.model import model_id

    url = f"sqlite:///{tmp_path / 'log.db'}"
    engine = db.make_engine(url)
    db.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("PRAGMA ignore_check_constraints = 1"))
        conn.execute(text(ROW.replace("'tiny'", ":model")), {"status": "pending",
                                                              "model": model_id(standin_components[0])})
    engine.dispose()
    with TestClient(create_app(app_settings(tmp_path, database_url=url), standin_components)) as c:
        for _ in range(200):  # the replay runs on the writer thread; /readyz reports how it ended
            r = c.get("/readyz")
            if "edit 1: 'pending'" in r.text:
                break
            time.sleep(0.05)
        assert r.status_code == 503 and "replaying the edit log failed" in r.json()["detail"], r.text
        assert "edit 1: 'pending'" in r.json()["detail"]
