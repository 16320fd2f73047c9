"""Reliability, in process (docs/reliability.md): a forced non-finite delta, a commit whose answer is
lost, and schemathesis fuzzing of the whole OpenAPI schema.

The fuzz runs ``FUZZ_CASES`` cases here and at least 1,000 under ``make soak`` (``HIEDIT_SOAK=1``).
Each test prints one ``RELIABILITY {...}`` JSON line: the figures docs/reliability.md quotes.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sqlite3
import time

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from conftest import SOAK, STANDIN_FACTS, app_settings, clean_replay_fingerprint, wait_ready
from editor_core.delta import LowRankDelta
from editor_core.editor import Proposal, StatelessEditor
from service.main import create_app

FACT1, FACT2 = STANDIN_FACTS
FUZZ_CASES = 1200 if SOAK else 240


def _report(name: str, **figures) -> None:
    print(f"RELIABILITY {json.dumps({'test': name, **figures})}")


def _fresh_components(model_dir, editor_dir, editor_wrapper=None):
    from editor_core.hiedit import HiEditor
    from editor_core.model import load_model

    model, tok = load_model(model_dir)
    editor = HiEditor.load(editor_dir, model, tok)
    return model, tok, {"hiedit": editor_wrapper(editor) if editor_wrapper else editor}, {"rlsedit": "off here"}


# ---- a forced non-finite delta ------------------------------------------------------------------------

class _Poisoned(StatelessEditor):
    """HiEdit's proposal with one entry of one factor replaced by ``value`` (NaN, +inf or -inf)."""

    method = "hiedit"

    def __init__(self, inner, value: float):
        self.inner, self.value = inner, value
        self.modules, self.cfg = inner.modules, inner.cfg
        self.committed: list[int] = []

    def propose(self, request, k=None):
        p = self.inner.propose(request, k)
        name = p.selected_modules[0]
        left, right = p.delta.factors[name]
        left = left.clone()
        left[0, 0] = self.value
        return Proposal(p.modules, p.importances, p.selected, LowRankDelta({**p.delta.factors, name: (left, right)}),
                        p.loss_before, p.n_tokens)

    def commit(self, edit_id, proposal):
        self.committed.append(edit_id)


def test_a_non_finite_delta_is_rejected_and_leaves_the_weights_unchanged(tmp_path, standin_model_dir,
                                                                           standin_editor_dir):
    # 1. proposed: the guard refuses it before anything is logged or applied
    for value in (math.nan, math.inf, -math.inf):
        model, tok, editors, unavailable = _fresh_components(standin_model_dir, standin_editor_dir,
                                                             lambda e: _Poisoned(e, value))
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        home = tmp_path / f"poisoned-{value}"
        with TestClient(create_app(app_settings(home), (model, tok, editors, unavailable))) as c:
            wait_ready(c)
            state0 = c.get("/state").json()
            r = c.post("/edits", json={"prompt": FACT1.prompt, "target": FACT1.target})
            assert r.status_code == 422, r.text
            assert r.json()["detail"] == "edit rejected by the guard: delta contains NaN or inf values"
            assert c.get("/state").json() == state0 and state0["fingerprint"] == state0["base_fingerprint"]
            assert c.get("/edits").json()["total"] == 0 and editors["hiedit"].committed == []
            assert 'hiedit_edits_total{method="hiedit",status="rejected"} 1.0' in c.get("/metrics").text
        assert all(torch.equal(p.detach(), weights[n]) for n, p in model.named_parameters())

    # 2. found in the log at start-up (a corrupted row): the replay marks it failed and leaves it out
    home = tmp_path / "corrupted"
    with TestClient(create_app(app_settings(home), _fresh_components(standin_model_dir, standin_editor_dir))) as c:
        wait_ready(c)
        base = c.get("/state").json()["base_fingerprint"]
        ids = [c.post("/edits", json={"prompt": f.prompt, "target": f.target}).json()["id"] for f in STANDIN_FACTS]
    con = sqlite3.connect(home / "hiedit.db")
    blob = con.execute("SELECT blob FROM edit_deltas WHERE edit_id = ?", (ids[0],)).fetchone()[0]
    delta = LowRankDelta.from_bytes(blob)
    name = delta.modules[0]
    delta.factors[name][1][0, 0] = math.nan
    con.execute("UPDATE edit_deltas SET blob = ? WHERE edit_id = ?", (delta.to_bytes(), ids[0]))
    con.commit()
    con.close()
    # A start from the weights checkpoint written at the stop would not re-read the rows it holds
    # (service/weights.py); a start without one (a fresh replica's home) replays, and checks, every row.
    shutil.rmtree(home / "state" / "weights")
    with TestClient(create_app(app_settings(home), _fresh_components(standin_model_dir, standin_editor_dir))) as c:
        wait_ready(c)
        first = c.get(f"/edits/{ids[0]}").json()
        assert first["status"] == "failed" and "NaN or inf" in first["error"]
        state = c.get("/state").json()
        assert state["active_edits"] == 1 and state["fingerprint"] != base
        assert state["fingerprint"] == clean_replay_fingerprint(f"sqlite:///{home / 'hiedit.db'}", standin_model_dir,
                                                                standin_editor_dir)
    _report("non_finite_delta", proposed_values=["nan", "inf", "-inf"], rejected_with_422=3,
            weights_unchanged=True, corrupted_log_row="marked failed at replay")


# ---- start-up: the batched replay is the same replay ------------------------------------------------

def test_batched_replay_builds_the_bytes_of_one_by_one_and_refuses_the_same_edits(standin_model_dir):
    """``ServedWeights.apply_many`` (one swap per module, how a start replays the log) against
    ``WeightState.apply`` one edit at a time: the same active edits, the same served bytes, the same
    refusals (a non-finite delta, a module the model lacks, an id out of order, and a sum that
    overflows float32, which sends it down the one-by-one path)."""
    from editor_core.model import load_model, model_id
    from editor_core.state import DeltaRejected, WeightState
    from service.weights import ServedWeights

    gen = torch.Generator().manual_seed(0)
    model_a, _ = load_model(standin_model_dir)
    model_b, _ = load_model(standin_model_dir)
    names = [n for n, _ in model_a.named_modules() if n.endswith(("gate_proj", "up_proj"))]
    shapes = {n: model_a.get_submodule(n).weight.shape for n in names}
    deltas = []
    for edit_id in range(1, 31):
        chosen = [names[int(i)] for i in torch.randperm(len(names), generator=gen)[:2]]
        factors = {}
        for n in chosen:
            r = int(torch.randint(1, 4, (1,), generator=gen))
            factors[n] = (torch.randn(shapes[n][0], r, generator=gen), torch.randn(r, shapes[n][1], generator=gen) * 0.1)
        deltas.append((edit_id, LowRankDelta(factors)))
    poisoned = LowRankDelta({n: (l.clone(), r) for n, (l, r) in deltas[6][1].factors.items()})
    next(iter(poisoned.factors.values()))[0][0, 0] = math.nan
    deltas[6] = (7, poisoned)
    deltas[10] = (11, LowRankDelta({"model.layers.9.mlp.gate_proj": (torch.ones(64, 1), torch.ones(1, 32))}))
    deltas.insert(15, (3, deltas[2][1]))  # out of order
    # WeightState's apply, one by one, summing as ServedWeights does: apply_many must give the same bytes
    reference = type("OneByOne", (WeightState,), {"_accumulate": ServedWeights._accumulate})(
        {n: model_a.get_submodule(n) for n in names}, model_id(model_a))

    def apply_one_by_one(state) -> set[int]:
        refused = set()
        for edit_id, delta in deltas:
            try:
                state.apply(edit_id, delta)
            except (DeltaRejected, ValueError):
                refused.add(edit_id)
        return refused
    refused_one_by_one = apply_one_by_one(reference)
    batched = ServedWeights({n: model_b.get_submodule(n) for n in names}, model_id(model_b))
    refused = batched.apply_many(deltas[:12])
    refused.update(batched.apply_many(deltas[12:]))
    assert set(refused) == refused_one_by_one == {3, 7, 11}
    assert batched.active_ids == reference.active_ids
    assert batched.fingerprint() == reference.fingerprint() != reference.base_fingerprint
    # ServedWeights.apply (how the engine applies a new edit) is apply_many of one: the same bytes and refusals
    model_c, _ = load_model(standin_model_dir)
    served = ServedWeights({n: model_c.get_submodule(n) for n in names}, model_id(model_c))
    assert apply_one_by_one(served) == refused_one_by_one
    assert served.active_ids == reference.active_ids and served.fingerprint() == reference.fingerprint()
    # a sum that overflows: the batch swaps nothing, then finds the culprit one by one, as apply does
    name = names[0]
    huge = LowRankDelta({name: (torch.full((shapes[name][0], 1), 1e20), torch.full((1, shapes[name][1]), 1e20))})
    small = deltas[0][1]
    with pytest.raises(DeltaRejected):
        reference.apply(100, huge)
    with pytest.raises(DeltaRejected, match="overflows"):  # and nothing changed
        served.apply(100, huge)
    assert served.fingerprint() == batched.fingerprint() and 100 not in served.active_ids
    reference.apply(101, small)
    refused = batched.apply_many([(100, huge), (101, small)])
    assert set(refused) == {100} and "overflows" in refused[100]
    assert batched.active_ids == reference.active_ids and batched.fingerprint() == reference.fingerprint()


def _rlsedit_app(tmp_path, model_dir):
    """A server with RLSEdit on and no HiEdit editor, its log and state under ``tmp_path``."""
    from service.loading import load_all

    cfg = app_settings(tmp_path, model=str(model_dir), editor="none", rlsedit_stats_tokens=2000)
    cfg = cfg.model_copy(update={"rlsedit": "on"})
    return create_app(cfg, load_all(cfg))


def _three_rlsedit_edits(client) -> list[int]:
    ids = []
    for prompt, target, subject in [(FACT1.prompt, FACT1.target, "The Eiffel Tower"),
                                    (FACT2.prompt, FACT2.target, "Danielle Darrieux"),
                                    ("Berlin is the capital of", "France", "Berlin")]:
        r = client.post("/edits", json={"prompt": prompt, "target": target, "subject": subject, "method": "rlsedit"})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def test_rlsedit_state_snapshot_spares_the_replay_and_forgets_what_was_rolled_back_since(tmp_path, standin_model_dir,
                                                                                         caplog):
    """A graceful stop snapshots RLSEdit's C; the next start loads it, so ``restore`` skips the edits in
    it (no Woodbury recursion to replay), and an edit the log rolled back after the snapshot (another
    writer, say) is forgotten: the state equals that of a start without the snapshot."""
    from sqlalchemy import create_engine, text

    with TestClient(_rlsedit_app(tmp_path, standin_model_dir)) as c:
        wait_ready(c)
        ids = _three_rlsedit_edits(c)
    snapshot = tmp_path / "state" / "rlsedit.safetensors"
    assert snapshot.is_file()
    three = snapshot.read_bytes()
    db_url = f"sqlite:///{tmp_path / 'hiedit.db'}"
    sql = create_engine(db_url)
    with sql.begin() as conn:  # rolled back behind this writer's back, after its snapshot
        conn.execute(text("UPDATE edits SET status = 'rolled_back' WHERE id = :i"), {"i": ids[1]})
    sql.dispose()

    def started():
        a = _rlsedit_app(tmp_path, standin_model_dir)
        client = TestClient(a)
        client.__enter__()
        wait_ready(client)
        return a, client

    caplog.set_level("INFO", logger="hiedit.engine")
    from_snapshot, c1 = started()
    assert f"rlsedit state from {snapshot} (3 edits in it, 1 since rolled back)" in caplog.text
    rls = from_snapshot.state.engine.editors["rlsedit"]
    assert sorted(rls.history) == [ids[0], ids[2]]
    state1 = c1.get("/state").json()
    c1.__exit__(None, None, None)
    snapshot.unlink()
    from_log, c2 = started()
    fresh = from_log.state.engine.editors["rlsedit"]
    assert sorted(fresh.history) == sorted(rls.history)
    assert all(torch.allclose(rls.C[n], fresh.C[n], rtol=1e-9, atol=1e-12) for n in fresh.modules)
    assert c2.get("/state").json()["fingerprint"] == state1["fingerprint"]
    c2.__exit__(None, None, None)
    # A snapshot holding a rolled-back edit the editor cannot forget (its logged keys are not the ones it
    # committed) is not used: the editor restarts from C_0 and replays the log, to the same state.
    snapshot.write_bytes(three)
    sql = create_engine(db_url)
    with sql.begin() as conn:
        conn.execute(text("UPDATE edit_deltas SET state_blob = (SELECT state_blob FROM edit_deltas WHERE edit_id = :a)"
                          " WHERE edit_id = :b"), {"a": ids[0], "b": ids[1]})
    sql.dispose()
    caplog.clear()
    refused, c3 = started()
    assert f"rlsedit snapshot {snapshot} not used: it holds edit {ids[1]}, since rolled back" in caplog.text
    rebuilt = refused.state.engine.editors["rlsedit"]
    assert sorted(rebuilt.history) == sorted(fresh.history)
    assert all(torch.allclose(rebuilt.C[n], fresh.C[n], rtol=1e-9, atol=1e-12) for n in fresh.modules)
    assert c3.get("/state").json()["fingerprint"] == state1["fingerprint"]
    c3.__exit__(None, None, None)


def test_a_log_sync_whose_forget_is_refused_rebuilds_the_editor_state(tmp_path, standin_model_dir, caplog):
    """The repair after an uncertain write (``_sync_with_log``) drops an edit the log no longer has applied. The
    log has already decided, so an editor that cannot forget it (here: its logged keys are not the committed
    ones) is not asked again: its state is rebuilt from C_0 and the log, the state a fresh start builds."""
    from sqlalchemy import create_engine, text

    caplog.set_level("INFO", logger="hiedit.engine")
    synced = _rlsedit_app(tmp_path, standin_model_dir)
    with TestClient(synced) as c:
        wait_ready(c)
        ids = _three_rlsedit_edits(c)
        sql = create_engine(f"sqlite:///{tmp_path / 'hiedit.db'}")
        with sql.begin() as conn:  # another writer rolled edit 2 back; its logged keys are edit 1's
            conn.execute(text("UPDATE edits SET status = 'rolled_back' WHERE id = :i"), {"i": ids[1]})
            conn.execute(text("UPDATE edit_deltas SET state_blob = (SELECT state_blob FROM edit_deltas WHERE "
                              "edit_id = :a) WHERE edit_id = :b"), {"a": ids[0], "b": ids[1]})
        sql.dispose()
        engine = synced.state.engine
        engine._log_uncertain = True               # as after a commit whose answer was lost
        assert c.post("/edits/999999/rollback").status_code == 404   # a write job: it syncs with the log first
        assert f"the rlsedit editor cannot forget edit {ids[1]}" in caplog.text
        assert "rlsedit editor state rebuilt from the log (2 edits)" in caplog.text
        rls = engine.editors["rlsedit"]
        assert sorted(rls.history) == [ids[0], ids[2]] and engine.state.active_ids == [ids[0], ids[2]]
        state = c.get("/state").json()
    (tmp_path / "state" / "rlsedit.safetensors").unlink()
    with TestClient(_rlsedit_app(tmp_path, standin_model_dir)) as c:   # a fresh start from the log alone
        wait_ready(c)
        fresh = c.app.state.engine.editors["rlsedit"]
        assert sorted(fresh.history) == sorted(rls.history)
        assert all(torch.allclose(rls.C[n], fresh.C[n], rtol=1e-9, atol=1e-12) for n in fresh.modules)
        assert c.get("/state").json()["fingerprint"] == state["fingerprint"]


def test_a_log_written_under_other_layers_stops_the_start_and_keeps_its_edits(tmp_path, standin_model_dir):
    """Edits of modules this server does not edit (the log was written with other RLSEdit layers) are
    not marked failed like a corrupted row: the start is refused, naming the edits and the setting,
    and the log keeps them, so a start with the log's settings serves them again."""
    from sqlalchemy import create_engine, text

    from service.loading import load_all

    def app(**kw):
        cfg = app_settings(tmp_path, model=str(standin_model_dir), editor="none", rlsedit_stats_tokens=2000, **kw)
        cfg = cfg.model_copy(update={"rlsedit": "on"})
        return create_app(cfg, load_all(cfg))

    with TestClient(app(rlsedit_layers="down[0-1]")) as c:
        wait_ready(c)
        r = c.post("/edits", json={"prompt": FACT1.prompt, "target": FACT1.target, "subject": "The Eiffel Tower",
                                   "method": "rlsedit"})
        assert r.status_code == 201, r.text
        edit_id, state = r.json()["id"], c.get("/state").json()
    with TestClient(app()) as c:                                      # the default: one layer, down[0]
        for _ in range(400):
            r = c.get("/readyz")
            if r.status_code == 503 and "replaying the edit log failed" in r.json()["detail"]:
                break
            time.sleep(0.05)
        detail = r.json()["detail"]
        assert r.status_code == 503, r.text
        assert f"edit {edit_id}: model.layers.1.mlp.down_proj" in detail and "--rlsedit-layers" in detail
        assert c.post("/edits", json={"prompt": FACT2.prompt, "target": FACT2.target}).status_code == 503
    sql = create_engine(f"sqlite:///{tmp_path / 'hiedit.db'}")
    with sql.connect() as conn:
        assert conn.execute(text("SELECT status FROM edits WHERE id = :i"), {"i": edit_id}).scalar() == "applied"
    sql.dispose()
    with TestClient(app(rlsedit_layers="down[0-1]")) as c:           # the log's own settings serve it again
        wait_ready(c)
        assert c.get("/state").json()["fingerprint"] == state["fingerprint"]


def test_the_audit_rank_needs_no_eigensolver(monkeypatch):
    """The audit's rank of ΔW = L R (LowRankDelta.rank) is exact and uses QR + SVD only: an eigensolver
    on (LᵀL)(RRᵀ) raised LinAlgError on edit 709 of a 1,000-edit demo stream, a 500 for an edit that
    was otherwise fine."""
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(64, 6, generator=g), torch.randn(6, 48, generator=g)
    left[:, 5] = left[:, 0] + left[:, 1]  # rank 5
    wide = (torch.randn(4, 9, generator=g), torch.randn(9, 7, generator=g))  # r > both dims: rank 4
    delta = LowRankDelta({"m": (left, right), "zero": (torch.zeros(64, 2), torch.zeros(2, 48)), "wide": wide})
    expected = {n: int(torch.linalg.matrix_rank(l.double() @ r.double(), rtol=1e-6)) for n, (l, r) in
                delta.factors.items()}
    assert expected == {"m": 5, "zero": 0, "wide": 4}

    def fails(*a, **k):
        raise torch.linalg.LinAlgError("torch.linalg.eigvals: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigvals", fails)
    assert {n: delta.rank(n) for n in expected} == expected


# ---- a commit whose answer is lost ---------------------------------------------------------------------

class _LosesCommitAnswers:
    """The engine's sessionmaker, except that an armed ``begin()`` commits and *then* fails the way a
    connection that died before the server's answer arrived fails: the outcome looks unknown."""

    def __init__(self, real):
        self.real = real
        self.armed = 0

    def __call__(self, *args, **kwargs):
        return self.real(*args, **kwargs)

    def begin(self):
        if not self.armed:
            return self.real.begin()
        self.armed -= 1

        @contextlib.contextmanager
        def lossy():
            with self.real.begin() as session:
                yield session
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
        return lossy()


def test_a_commit_whose_answer_is_lost_is_reconciled_before_the_next_write(tmp_path, standin_model_dir,
                                                                             standin_editor_dir):
    url = f"sqlite:///{tmp_path / 'hiedit.db'}"
    with TestClient(create_app(app_settings(tmp_path), _fresh_components(standin_model_dir,
                                                                         standin_editor_dir))) as c:
        wait_ready(c)
        engine = c.app.state.engine
        engine.sessions = lossy = _LosesCommitAnswers(engine.sessions)
        first = c.post("/edits", json={"prompt": FACT1.prompt, "target": FACT1.target}).json()["id"]

        # an edit: logged, but the engine cannot know, so it is not applied and the client gets 503
        lossy.armed = 1
        r = c.post("/edits", json={"prompt": FACT2.prompt, "target": FACT2.target}, headers={"Idempotency-Key": "f2"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["detail"].startswith("database: the edit could not be logged, so it was not applied")
        logged = c.get("/edits").json()["edits"]
        assert [e["status"] for e in logged] == ["applied", "applied"]  # the log has it ...
        assert c.get("/state").json()["active_edits"] == 1               # ... the weights do not yet
        # the retry (same key) first brings the weights in line with the log, then finds the edit
        again = c.post("/edits", json={"prompt": FACT2.prompt, "target": FACT2.target}, headers={"Idempotency-Key": "f2"})
        assert again.status_code == 200 and again.json()["id"] == logged[0]["id"], again.text
        state = c.get("/state").json()
        assert state["active_edits"] == 2 and state["fingerprint"] == clean_replay_fingerprint(
            url, standin_model_dir, standin_editor_dir)

        # a rollback: logged as rolled back, the weights keep the edit until the next write
        lossy.armed = 1
        r = c.post(f"/edits/{first}/rollback")
        assert r.status_code == 503, r.text
        assert c.get(f"/edits/{first}").json()["status"] == "rolled_back"
        assert c.get("/state").json()["active_edits"] == 2
        again = c.post(f"/edits/{first}/rollback")
        assert again.status_code == 409 and "already rolled back" in again.json()["detail"]
        state = c.get("/state").json()
        assert state["active_edits"] == 1 and state["fingerprint"] == clean_replay_fingerprint(
            url, standin_model_dir, standin_editor_dir)
        assert 'hiedit_edits_total{method="hiedit",status="error"} 2.0' in c.get("/metrics").text
    _report("lost_commit_answer", edit="applied by the next write", rollback="applied by the next write",
            fingerprint_equals_clean_replay=True)


# ---- fuzzing the OpenAPI schema -----------------------------------------------------------------------

def test_fuzz_every_operation_no_5xx_and_rejected_requests_change_nothing(tmp_path, standin_model_dir,
                                                                         standin_editor_dir):
    """schemathesis cases for every operation of /openapi.json, valid and invalid by the schema, against
    the in-process app with both methods on. No answer may be a 5xx, and every answer that is not a
    2xx must leave the served weights (fingerprint) and the log exactly as they were."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    from service.loading import load_all

    app_cfg = app_settings(tmp_path, model=str(standin_model_dir), editor=str(standin_editor_dir),
                           rlsedit_stats_tokens=2000, max_new_tokens=16, max_rephrases=2, max_locality=2)
    # the stand-in's HiEdit layers reach RLSEdit's: allowed here, every operation is what is fuzzed
    app_cfg = app_cfg.model_copy(update={"rlsedit": "on", "rlsedit_overlap": "allow"})
    app = create_app(app_cfg, load_all(app_cfg))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    base_seed = random.randrange(2**32) if SOAK else 0  # CI runs the same cases every time
    seen = {"cases": 0, "statuses": {}, "rejected": 0, "accepted_changes": 0}
    failures: list[str] = []

    with TestClient(app) as lifespan:  # runs the lifespan (engine, replay); schemathesis calls the same app
        wait_ready(lifespan)
        engine = app.state.engine

        def log_state() -> tuple:
            with engine.sessions() as session:
                from service import crud
                return crud.applied_edit_ids(session), crud.count_edits(session), len(crud.list_probes(session))

        def fuzz(operation, mode, examples: int, run_seed: int) -> int:
            """Up to ``examples`` cases of one operation; returns how many hypothesis made."""
            before = seen["cases"]

            @seed(run_seed)
            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                fingerprint, log = engine.fingerprint(), log_state()
                response = case.call()
                status = response.status_code
                seen["cases"] += 1
                seen["statuses"][status] = seen["statuses"].get(status, 0) + 1
                where = f"{case.method} {case.formatted_path} ({mode.value}) -> {status}"
                if status >= 500:
                    failures.append(f"{where}: {response.text[:300]}")
                elif status >= 300:
                    seen["rejected"] += 1
                    if engine.fingerprint() != fingerprint or log_state() != log:
                        failures.append(f"{where} changed the weights or the log")
                elif engine.fingerprint() != fingerprint:
                    seen["accepted_changes"] += 1
            try:
                run()
            except Unsatisfiable:  # an operation without inputs has no invalid ones (GET /healthz)
                assert mode is GenerationMode.NEGATIVE, f"{operation.label}: no valid case"
            return seen["cases"] - before

        # passes with fresh seeds until the budget is spent; an operation whose inputs are exhausted
        # (hypothesis made fewer cases than asked) is left out of the next passes
        live = [(op, mode) for op in operations for mode in modes]
        passes = 0
        while seen["cases"] < FUZZ_CASES and live:
            examples = max(1, math.ceil((FUZZ_CASES - seen["cases"]) / len(live)))
            live = [(op, mode) for op, mode in live if fuzz(op, mode, examples, base_seed + passes) >= examples]
            passes += 1
    _report("fuzz", cases=seen["cases"], seed=base_seed, passes=passes, operations=len(operations), rejected=seen["rejected"],
            accepted_changes_of_weights=seen["accepted_changes"],
            statuses={str(k): v for k, v in sorted(seen["statuses"].items())}, failures=len(failures))
    assert not failures, "\n".join(failures[:20])
    assert seen["cases"] >= FUZZ_CASES, seen
