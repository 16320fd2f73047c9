"""The log knows its base model: every edit row records the model's name and base fingerprint, and a
server (writer or replica) started on another base model with a non-empty log refuses to start,
naming both, and replays nothing; ``hiedit serve`` then exits with status 2 and the message."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from conftest import REPO, STANDIN_FACTS, STANDIN_K, STANDIN_LR, STANDIN_SPEC, app_settings, wait_ready
from service.engine.errors import BaseModelMismatch
from service.main import create_app

FACT1, FACT2 = STANDIN_FACTS


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory) -> Path:
    """A stand-in of the same shape as the standard one, with other weights (seed 1) and another name."""
    from editor_core.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other-model"), "llama", seed=1, hidden=32, layers=2,
                            intermediate=64, heads=4, kv_heads=2)


def _components(model_dir: Path, spec: str = STANDIN_SPEC):
    """(model, tokenizer, editors, unavailable) with an untrained HiEdit editor over ``spec``."""
    from editor_core.hiedit import HiEditor
    from editor_core.model import load_model

    model, tok = load_model(model_dir)
    editor = HiEditor.create(model, tok, spec, k=STANDIN_K, lr_init=STANDIN_LR)
    return model, tok, {"hiedit": editor}, {"rlsedit": "disabled in this test"}


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _write_one_edit(home: Path, components, **kw) -> dict:
    """Start an app on ``components``, make one edit; returns {edit, state_before, base_fingerprint}."""
    home.mkdir(parents=True, exist_ok=True)
    app = create_app(app_settings(home, **kw), components)
    with TestClient(app) as c:
        wait_ready(c)
        before = c.get("/state").json()
        r = c.post("/edits", json={"prompt": FACT1.prompt, "target": FACT1.target})
        assert r.status_code == 201, r.text
        return {"edit": r.json(), "state_before": before, "base_fingerprint": app.state.engine.base_fingerprint}


def _rows(url: str) -> list[tuple]:
    sql = create_engine(url)
    try:
        with sql.connect() as conn:
            return [tuple(r) for r in conn.execute(text("SELECT id, status, model, base_fingerprint FROM edits "
                                                        "ORDER BY id"))]
    finally:
        sql.dispose()


def test_an_edit_records_its_base_model(tmp_path, standin_components):
    from editor_core.model import model_id
    from service.weights import base_model_fingerprint

    model = standin_components[0]
    base = base_model_fingerprint(model, model_id(model))  # before the app exists: W⁰
    written = _write_one_edit(tmp_path, standin_components)
    assert written["base_fingerprint"] == base
    # the weights the edit was made on are exactly the base: GET /state before any edit showed them
    assert written["state_before"]["fingerprint"] == written["state_before"]["base_fingerprint"]
    assert written["state_before"]["active_edits"] == 0
    [(edit_id, status, name, fp)] = _rows(f"sqlite:///{tmp_path / 'hiedit.db'}")
    assert (edit_id, status) == (written["edit"]["id"], "applied")
    assert name == model_id(model) == written["state_before"]["model"] and fp == base and len(fp) == 64
    # the model's weights changed with the edit; the recorded base did not
    assert base_model_fingerprint(model, model_id(model)) != base


def test_a_server_on_another_base_model_refuses_to_start_and_replays_nothing(
        database_url, tmp_path, standin_model_dir, other_model_dir):
    a = _write_one_edit(tmp_path / "a", _components(standin_model_dir), database_url=database_url)
    rows = _rows(database_url)
    other = _components(other_model_dir)
    untouched = _weights(other[0])
    app = create_app(app_settings(tmp_path / "b", database_url=database_url), other)
    with pytest.raises(BaseModelMismatch) as refused:
        with TestClient(app):
            pytest.fail("the app started on a log of another base model")
    msg = refused.value.detail
    assert f"'{standin_model_dir.name}' (fingerprint {a['base_fingerprint'][:12]}…, 1 edit)" in msg, msg
    assert f"this server runs '{other_model_dir.name}'" in msg and f"--model {standin_model_dir.name}" in msg, msg
    assert "nothing was replayed" in msg and "--database-url" in msg
    assert app.state.startup_failure == msg and app.state.engine is None
    # nothing was replayed: B's weights are its base weights; the log is as A left it
    assert all(torch.equal(p, untouched[n]) for n, p in other[0].named_parameters())
    assert _rows(database_url) == rows
    # A itself still starts on its log and serves the edit
    with TestClient(create_app(app_settings(tmp_path / "a2", database_url=database_url),
                               _components(standin_model_dir))) as c:
        wait_ready(c)
        assert c.get("/state").json()["active_edits"] == 1


def test_same_name_other_weights_and_rows_without_a_fingerprint(tmp_path, standin_model_dir, other_model_dir):
    """Another model under the same directory name is refused on its fingerprint; rows logged before
    migration 0003 (no fingerprint) are compared by name only."""
    url = f"sqlite:///{tmp_path / 'hiedit.db'}"
    _write_one_edit(tmp_path, _components(standin_model_dir))
    impostor = tmp_path / "impostor" / standin_model_dir.name
    shutil.copytree(other_model_dir, impostor)
    with pytest.raises(BaseModelMismatch, match="has other weights") as refused:
        with TestClient(create_app(app_settings(tmp_path), _components(impostor))):
            pass
    assert refused.value.detail.count(f"'{standin_model_dir.name}'") >= 2
    sql = create_engine(url)
    with sql.begin() as conn:
        conn.execute(text("UPDATE edits SET base_fingerprint = NULL"))
    sql.dispose()
    with TestClient(create_app(app_settings(tmp_path), _components(impostor))) as c:  # same name: accepted
        wait_ready(c)
        assert c.get("/state").json()["active_edits"] == 1
    with pytest.raises(BaseModelMismatch, match="no fingerprint recorded"):
        with TestClient(create_app(app_settings(tmp_path), _components(other_model_dir))):
            pass


def test_other_editor_settings_on_the_same_base_model_are_not_another_base_model(tmp_path, standin_model_dir):
    """GET /state's base_fingerprint covers the editable modules, so it changes with the editor settings;
    the log's base fingerprint does not, and the edit replays under a wider editor."""
    written = _write_one_edit(tmp_path, _components(standin_model_dir))
    wider = _components(standin_model_dir, "gate[0-1],up[0-1],down[0-1]")
    app = create_app(app_settings(tmp_path), wider)
    with TestClient(app) as c:
        wait_ready(c)
        state = c.get("/state").json()
        assert state["base_fingerprint"] != written["state_before"]["base_fingerprint"]
        assert app.state.engine.base_fingerprint == written["base_fingerprint"]
        assert state["active_edits"] == 1


def test_a_replica_on_another_base_model_refuses_too(tmp_path, standin_model_dir, other_model_dir):
    url = f"sqlite:///{tmp_path / 'hiedit.db'}"
    _write_one_edit(tmp_path, _components(standin_model_dir))
    other = _components(other_model_dir)
    untouched = _weights(other[0])
    app = create_app(app_settings(tmp_path / "replica", database_url=url, role="replica"), other)
    with pytest.raises(BaseModelMismatch, match=f"this server runs '{other_model_dir.name}'"):
        with TestClient(app):
            pass
    assert all(torch.equal(p, untouched[n]) for n, p in other[0].named_parameters())


def test_a_replica_does_not_apply_edits_logged_for_another_base_model(tmp_path, standin_model_dir, other_model_dir):
    """A replica that started on an empty log checks the edits it is about to apply, too."""
    from service.replica import ReplicaEngine

    url = f"sqlite:///{tmp_path / 'hiedit.db'}"
    replica_app = create_app(app_settings(tmp_path / "replica", database_url=url, role="replica",
                                          replica_poll_seconds=3600), _components(other_model_dir))
    writer_app = create_app(app_settings(tmp_path, database_url=url), _components(standin_model_dir))
    with TestClient(writer_app) as w, TestClient(replica_app) as r:
        wait_ready(w)
        wait_ready(r)
        base = r.get("/state").json()["fingerprint"]
        assert w.post("/edits", json={"prompt": FACT1.prompt, "target": FACT1.target}).status_code == 201
        engine = replica_app.state.engine
        assert isinstance(engine, ReplicaEngine)
        with pytest.raises(BaseModelMismatch, match="nothing was replayed"):
            engine._submit(engine._sync).result(60)
        assert r.get("/state").json()["fingerprint"] == base and engine.state.active_ids == []


def test_serve_on_a_log_of_another_base_model_exits_2_with_the_message(
        server_factory, tmp_path, standin_model_dir, standin_editor_dir, other_model_dir):
    import httpx

    home = tmp_path / "home"
    home.mkdir()
    common = ["--rlsedit", "off", "--probe-every-edits", "0", "--probe-every-seconds", "0", "--torch-threads", "1"]
    server = server_factory("--model", str(standin_model_dir), "--editor", str(standin_editor_dir), *common,
                            home=home, env={"HIEDIT_API_KEYS": ""})
    r = httpx.post(server.url + "/edits", json={"prompt": FACT1.prompt, "target": FACT1.target}, timeout=60)
    assert r.status_code == 201, r.text
    server.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIEDIT_")}
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "0", "--home", str(home),
                           "--model", str(other_model_dir), "--untrained-editor", STANDIN_SPEC,
                           "--untrained-lr", str(STANDIN_LR), *common],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("hiedit serve: the edit log at sqlite:///"), done.stderr[-3000:]
    assert f"'{standin_model_dir.name}'" in last and f"'{other_model_dir.name}'" in last
    assert "nothing was replayed" in last
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # the log is untouched: the writer on its own model serves the edit again
    server.start()
    assert httpx.get(server.url + "/state", timeout=10).json()["active_edits"] == 1
