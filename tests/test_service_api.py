"""In-process service tests (FastAPI TestClient, lifespan included) on SQLite.

What the uvicorn e2e suite does not cover: idempotency rules, a delta that fails *after* it
was logged, replay in a second app, probes in the background, metrics values, sampling seeds,
methods that are not available, RLSEdit through the API, and readers never seeing a half-applied edit.
"""
from __future__ import annotations

import threading
import time

import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import STANDIN_FACTS, STANDIN_K, STANDIN_OTHER_PROMPT, app_settings, wait_ready
from editor_core.delta import LowRankDelta
from editor_core.editor import Proposal
from service.engine.locking import RWLock
from service.main import create_app
from service.settings import Settings

FACT1, FACT2 = STANDIN_FACTS


def _client(tmp_path, components, **kw) -> TestClient:
    app = create_app(app_settings(tmp_path, **kw), components)
    return TestClient(app)


def _edit(c, fact=FACT1, **extra):
    return c.post("/edits", json={"prompt": fact.prompt, "target": fact.target, **extra})


def _metrics(c) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(c.get("/metrics").text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def test_idempotency_key_same_body_returns_original_other_body_409(tmp_path, standin_components):
    with _client(tmp_path, standin_components) as c:
        wait_ready(c)
        first = c.post("/edits", json={"prompt": FACT1.prompt, "target": FACT1.target},
                       headers={"Idempotency-Key": "k1"})
        assert first.status_code == 201
        fp = c.get("/state").json()["fingerprint"]
        again = c.post("/edits", json={"target": FACT1.target, "prompt": FACT1.prompt},  # key order is irrelevant
                       headers={"Idempotency-Key": "k1"})
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == f"/edits/{first.json()['id']}"
        other = c.post("/edits", json={"prompt": FACT1.prompt, "target": "Paris"}, headers={"Idempotency-Key": "k1"})
        assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
        assert c.get("/state").json()["fingerprint"] == fp and c.get("/edits").json()["total"] == 1
        # without a key the same body is a new edit
        assert _edit(c).status_code == 201 and c.get("/edits").json()["total"] == 2


def test_concurrent_requests_with_one_key_make_one_edit(tmp_path, standin_components):
    with _client(tmp_path, standin_components) as c:
        wait_ready(c)
        results = []

        def post():
            results.append(c.post("/edits", json={"prompt": FACT1.prompt, "target": FACT1.target},
                                  headers={"Idempotency-Key": "same"}))
        threads = [threading.Thread(target=post) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r.status_code for r in results) == [200, 200, 200, 201]
        assert len({r.json()["id"] for r in results}) == 1
        assert c.get("/state").json()["active_edits"] == 1


class _OverflowEditor:
    """Proposes a finite delta whose product overflows float32: it passes the guard, fails to apply."""

    method = "hiedit"

    def __init__(self, inner):
        self.inner = inner
        self.modules = inner.modules
        self.cfg = inner.cfg
        self.committed: list[int] = []

    def propose(self, request, k=None):
        p = self.inner.propose(request, k)
        name = p.selected_modules[0]
        left, right = p.delta.factors[name]
        big = LowRankDelta({name: (torch.full_like(left, 1e20), torch.full_like(right, 1e20))})
        return Proposal(p.modules, p.importances, [p.modules.index(name)], big, p.loss_before, p.n_tokens)

    def commit(self, edit_id, proposal):
        self.committed.append(edit_id)

    def forget(self, edit_id, state_blob):
        pass

    def prepare_forget(self, edit_id, state_blob):
        return lambda: None

    def reset(self):
        pass

    def restore(self, edit_id, blob):
        pass


def test_apply_failure_after_logging_marks_the_edit_failed_and_changes_nothing(tmp_path, standin_components):
    model, tok, editors, unavailable = standin_components
    bad = _OverflowEditor(editors["hiedit"])
    app = create_app(app_settings(tmp_path, delta_norm_bound=1e300), (model, tok, {"hiedit": bad}, unavailable))
    with TestClient(app) as c:
        wait_ready(c)
        fp0 = c.get("/state").json()["fingerprint"]
        r = _edit(c)
        assert r.status_code == 422 and "overflows" in r.json()["detail"], r.text
        edit_id = r.json()["edit_id"]
        rec = c.get(f"/edits/{edit_id}").json()
        assert rec["status"] == "failed" and "apply" in rec["error"]
        assert c.get("/state").json()["fingerprint"] == fp0 and bad.committed == []
        assert c.post(f"/edits/{edit_id}/rollback").status_code == 409
        assert _metrics(c)["hiedit_edits_total{method=hiedit,status=failed}"] == 1
    # the guard refuses it before logging when the norm bound is in force
    with _client(tmp_path / "b", (model, tok, {"hiedit": bad}, unavailable)) as c:
        wait_ready(c)
        r = _edit(c)
        assert r.status_code == 422 and "norm" in r.json()["detail"]
        assert c.get("/edits").json()["total"] == 0


def test_second_app_replays_the_log_to_the_same_fingerprint(tmp_path, standin_model_dir, standin_editor_dir):
    from editor_core.hiedit import HiEditor
    from editor_core.model import load_model

    def components():
        model, tok = load_model(standin_model_dir)
        return model, tok, {"hiedit": HiEditor.load(standin_editor_dir, model, tok)}, {}

    with _client(tmp_path, components()) as c:
        wait_ready(c)
        ids = [_edit(c, f).json()["id"] for f in (FACT1, FACT2, FACT1)]
        assert c.post(f"/edits/{ids[1]}/rollback").status_code == 200
        live = c.get("/state").json()
        answer = c.get("/generate", params={"prompt": FACT1.prompt, "max_new_tokens": 4}).json()
    with _client(tmp_path, components()) as c:
        wait_ready(c)
        assert c.get("/state").json() == live
        assert c.get("/generate", params={"prompt": FACT1.prompt, "max_new_tokens": 4}).json() == answer
        assert [e["status"] for e in c.get("/edits").json()["edits"]] == ["applied", "rolled_back", "applied"]


def test_listing_filters_and_pages_newest_first(tmp_path, standin_components):
    with _client(tmp_path, standin_components) as c:
        wait_ready(c)
        ids = [_edit(c, f).json()["id"] for f in (FACT1, FACT2, FACT1)]
        c.post(f"/edits/{ids[0]}/rollback")
        page = c.get("/edits", params={"limit": 2}).json()
        assert [e["id"] for e in page["edits"]] == ids[::-1][:2] and page["total"] == 3
        assert [e["id"] for e in c.get("/edits", params={"limit": 2, "offset": 2}).json()["edits"]] == [ids[0]]
        rolled = c.get("/edits", params={"status": "rolled_back"}).json()
        assert [e["id"] for e in rolled["edits"]] == [ids[0]] and rolled["total"] == 1
        assert c.get("/edits", params={"status": "applied"}).json()["total"] == 2


def test_edit_check_off_applies_the_proposal_unscored(tmp_path, standin_components):
    """HIEDIT_EDIT_CHECK=off: no take check, no scoring; the edit is applied and replays like any other."""
    with _client(tmp_path, standin_components, edit_check="off") as c:
        wait_ready(c)
        base = c.get("/state").json()["fingerprint"]
        r = _edit(c)
        assert r.status_code == 201, r.text
        edit = r.json()
        assert edit["status"] == "applied" and edit["efficacy"] is None
        state = c.get("/state").json()
        assert state["active_edits"] == 1 and state["fingerprint"] != base
        assert c.get(f"/edits/{edit['id']}").json()["fingerprint_after"] == state["fingerprint"]


def test_probe_report_specificity_retention_and_gauges(tmp_path, standin_components):
    with _client(tmp_path, standin_components, probe_every_edits=1) as c:
        wait_ready(c)
        empty = c.get("/probes/report").json()
        assert empty["specificity"] is None and empty["edit_retention"] is None
        for prompt in (STANDIN_OTHER_PROMPT, FACT1.prompt):
            assert c.post("/probes", json={"prompt": prompt, "max_new_tokens": 3}).status_code == 201
        probes = c.get("/probes").json()["probes"]
        assert [p["prompt"] for p in probes] == [STANDIN_OTHER_PROMPT, FACT1.prompt]
        edit = _edit(c, locality=[{"prompt": STANDIN_OTHER_PROMPT, "target": "of"},
                                  {"prompt": FACT2.prompt, "target": "Dutch"}]).json()
        eff = edit["efficacy"]  # the model says " of" and not " Dutch" before and after this edit
        assert eff["locality_before"] == 0.5 and eff["locality_after"] == 0.5
        deadline = time.monotonic() + 30  # the writer recomputes after every edit (probe_every_edits=1)
        while time.monotonic() < deadline:
            report = c.get("/probes/report").json()
            if report["active_edits"] == 1:
                break
            time.sleep(0.05)
        # the probe on the edited prompt changed, the other did not; the edit is retained
        assert report["changed_probes"] == [probes[1]["id"]] and report["specificity"] == 0.5
        assert report["edit_retention"] == 1.0 and report["lost_edits"] == []
        m = _metrics(c)
        assert m["hiedit_probe_specificity_ratio"] == 0.5 and m["hiedit_edit_retention_ratio"] == 1.0
        assert c.delete(f"/probes/{probes[1]['id']}").status_code == 204
        fresh = c.get("/probes/report", params={"refresh": True}).json()
        assert fresh["probes"] == 1 and fresh["specificity"] == 1.0
        c.post(f"/edits/{edit['id']}/rollback")
        assert c.get("/probes/report", params={"refresh": True}).json()["edit_retention"] is None


def test_probe_report_recomputed_on_a_timer(tmp_path, standin_components):
    with _client(tmp_path, standin_components, probe_every_seconds=0.5) as c:
        wait_ready(c)
        c.post("/probes", json={"prompt": STANDIN_OTHER_PROMPT})
        engine = c.app.state.engine
        deadline = time.monotonic() + 30
        while (engine.report is None or engine.report.probes == 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert engine.report is not None and engine.report.probes == 1 and engine.report.specificity == 1.0


def test_metrics_count_edits_rejections_selections_and_tokens(tmp_path, standin_components):
    with _client(tmp_path, standin_components) as c:
        wait_ready(c)
        _edit(c)
        _edit(c, FACT2, k=1)
        assert _edit(c, k=99).status_code == 422
        c.get("/generate", params={"prompt": FACT1.prompt, "max_new_tokens": 5})
        c.post("/edits/1/rollback")
        m = _metrics(c)
        assert m["hiedit_edits_total{method=hiedit,status=applied}"] == 2
        assert m["hiedit_edits_total{method=hiedit,status=rejected}"] == 1
        assert m["hiedit_rollbacks_total"] == 1 and m["hiedit_active_edits"] == 1
        assert m["hiedit_edit_duration_seconds_count{method=hiedit}"] == 2
        assert sum(v for k, v in m.items() if k.startswith("hiedit_layer_selections_total")) == STANDIN_K + 1
        assert m["hiedit_generated_tokens_total"] == 5 and m["hiedit_generate_duration_seconds_count"] == 1
        assert not any("Eiffel" in k or "edit_id" in k for k in m)  # no prompts or ids in labels


def test_generate_get_post_and_seeded_sampling(tmp_path, standin_components):
    with _client(tmp_path, standin_components, max_new_tokens=4096) as c:
        wait_ready(c)
        g = c.get("/generate", params={"prompt": FACT1.prompt, "max_new_tokens": 6}).json()
        p = c.post("/generate", json={"prompt": FACT1.prompt, "max_new_tokens": 6}).json()
        assert g == p and g["tokens"] == 6 and not g["text"].startswith(FACT1.prompt)
        s1 = c.post("/generate", json={"prompt": FACT1.prompt, "max_new_tokens": 12, "temperature": 1.5, "seed": 7})
        s2 = c.get("/generate", params={"prompt": FACT1.prompt, "max_new_tokens": 12, "temperature": 1.5, "seed": 7})
        assert s1.json() == s2.json()
        eos = c.post("/generate", json={"prompt": FACT1.prompt, "max_new_tokens": 40, "ignore_eos": True}).json()
        assert eos["tokens"] == 40
        ctx = c.app.state.engine.model.config.max_position_embeddings
        r = c.post("/generate", json={"prompt": FACT1.prompt, "max_new_tokens": ctx, "temperature": 0})
        assert r.status_code == 422 and "max_new_tokens" in r.json()["detail"] and "context" in r.json()["detail"]
        others = {c.post("/generate", json={"prompt": FACT1.prompt, "max_new_tokens": 12, "temperature": 1.5,
                                            "seed": s}).json()["text"] for s in range(8)}
        assert len(others) > 1  # sampling really samples


def test_editor_none_serves_generation_and_refuses_edits_with_503(tmp_path, standin_components):
    model, tok, _, _ = standin_components
    with _client(tmp_path, (model, tok, {}, {"hiedit": "started with --editor none"})) as c:
        wait_ready(c)
        assert c.get("/generate", params={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
        r = _edit(c)
        assert r.status_code == 503 and "method" in r.json()["detail"] and "--editor none" in r.json()["detail"]
        assert c.get("/state").json()["methods"] == [] and c.get("/edits").json()["total"] == 0


def test_rlsedit_through_the_api(tmp_path, standin_model_dir):
    from service.loading import load_all

    settings = Settings(home=tmp_path, model=str(standin_model_dir), editor="none", rlsedit="on",
                        rlsedit_stats_tokens=2000, torch_threads=1, probe_every_seconds=0)
    components = load_all(settings)
    with TestClient(create_app(settings, components)) as c:
        wait_ready(c)
        fp0 = c.get("/state").json()["fingerprint"]
        r = c.post("/edits", json={"prompt": FACT1.prompt, "target": FACT1.target, "method": "rlsedit",
                                   "subject": "The Eiffel Tower"})
        assert r.status_code == 201, r.text
        rec = r.json()
        assert rec["method"] == "rlsedit" and rec["efficacy"]["after"] > rec["efficacy"]["before"]
        layers = c.get(f"/edits/{rec['id']}/layers").json()["layers"]
        assert layers and all(l["module"].endswith("down_proj") and l["selected"] for l in layers)
        assert c.post("/edits", json={"prompt": FACT1.prompt, "target": FACT1.target, "method": "rlsedit",
                                      "k": 99}).status_code == 422
        # An editor that cannot forget the edit (here its log's keys no longer match the committed digest)
        # refuses the rollback before anything changes: weights, log and C keep the edit.
        rls = components[2]["rlsedit"]
        fp1, digest = c.get("/state").json()["fingerprint"], rls.history[rec["id"]]
        rls.history[rec["id"]] = "0" * len(digest)
        r = c.post(f"/edits/{rec['id']}/rollback")
        assert r.status_code == 409 and "cannot forget" in r.json()["detail"] and "nothing changed" in r.json()["detail"]
        assert c.get("/state").json()["fingerprint"] == fp1 and fp1 != fp0
        assert c.get(f"/edits/{rec['id']}").json()["status"] == "applied" and rec["id"] in rls.history
        rls.history[rec["id"]] = digest
        assert c.post(f"/edits/{rec['id']}/rollback").status_code == 200
        assert c.get("/state").json()["fingerprint"] == fp0 and rec["id"] not in rls.history


def test_readers_never_see_a_half_applied_edit(tmp_path, standin_components):
    """What readers see during 10 edit/rollback cycles is always the state before or after the edit, never a mix.

    The edit changes all four editable modules (k = 4), so a half-applied state is one with some of them
    swapped. Greedy answers of the stand-in are too coarse to tell each such state apart, so readers also
    take, under the read side of the lock as generation does, the log-probability of the target (one
    teacher-forced pass) and the digest of the served weights: the test first checks that every
    half-applied state (each proper subset of the edit's modules, served on trial) gives a log-probability
    that is neither the before nor the after one; the readers then see only those two, and two digests."""
    import hashlib
    import itertools

    from service import crud

    with _client(tmp_path, standin_components) as c:
        wait_ready(c)
        engine = c.app.state.engine
        modules = list(engine.state.modules)
        assert len(modules) == 4
        rows = engine._token_rows([(FACT1.prompt, FACT1.target)])

        def logp() -> float:  # unlocked: only while nothing changes the weights, or under a lock
            return engine._teacher_forced(rows)[0][1]

        def locked_logp() -> float:
            with engine.lock.read():
                return logp()

        def weights() -> str:
            with engine.lock.read():
                return hashlib.sha256(b"".join(engine.state.modules[n].weight.detach().cpu().numpy().tobytes()
                                               for n in modules)).hexdigest()

        q = dict(prompt=FACT1.prompt, max_new_tokens=2)
        before, lp_before, w_before = c.get("/generate", params=q).json()["text"], logp(), weights()
        r = _edit(c, k=len(modules))
        assert r.status_code == 201, r.text
        eid = r.json()["id"]
        after, lp_after, w_after = c.get("/generate", params=q).json()["text"], logp(), weights()
        assert before != after and lp_before != lp_after and w_before != w_after
        with engine.sessions() as session:
            (_, blob), = crud.delta_blobs(session, [eid])
        delta = LowRankDelta.from_bytes(blob)
        assert sorted(delta.modules) == sorted(modules)  # the edit changes every module
        assert c.post(f"/edits/{eid}/rollback").status_code == 200
        for n in range(1, len(modules)):  # a half-applied edit would show
            for part in itertools.combinations(modules, n):
                with engine.lock.write(), engine.state.trial(LowRankDelta({m: delta.factors[m] for m in part})):
                    half = logp()
                assert half not in (lp_before, lp_after), part
        assert logp() == lp_before and weights() == w_before
        seen, seen_logp, seen_weights, stop = [], set(), set(), threading.Event()

        def reader():
            while not stop.is_set():
                seen.append(engine.generate(FACT1.prompt, 2)[0])

        def logp_reader():
            while not stop.is_set():
                seen_logp.add(locked_logp())

        def weight_reader():
            while not stop.is_set():
                seen_weights.add(weights())
        threads = [threading.Thread(target=f) for f in (reader, reader, logp_reader, weight_reader)]
        for t in threads:
            t.start()
        try:  # edits capture gradients on the writer while the readers generate on the same model
            for _ in range(10):
                r = _edit(c, k=len(modules))
                assert r.status_code == 201, r.text
                assert c.post(f"/edits/{r.json()['id']}/rollback").status_code == 200
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert seen and set(seen) <= {before, after}
        assert seen_logp and seen_logp <= {lp_before, lp_after}, (seen_logp, lp_before, lp_after)
        assert seen_weights and seen_weights <= {w_before, w_after}
        print(f"{len(seen)} answers, {len(seen_logp)} log-probabilities, {len(seen_weights)} weight digests seen")


def test_rwlock_writer_waits_for_readers_and_blocks_new_ones():
    lock, order = RWLock(), []
    reading = threading.Event()

    def reader():
        with lock.read():
            reading.set()
            time.sleep(0.2)
            order.append("reader done")

    def writer():
        reading.wait()
        with lock.write():
            order.append("writer")

    t1, t2 = threading.Thread(target=reader), threading.Thread(target=writer)
    t1.start(), t2.start()
    t1.join(), t2.join()
    assert order == ["reader done", "writer"]


def test_serve_cli_explains_a_missing_editor(tmp_path, standin_model_dir, monkeypatch, capsys):
    import argparse

    from service import loading
    from service.cli import serve as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.configure(parser)
    args = parser.parse_args(["--model", str(standin_model_dir), "--editor", str(tmp_path / "nope"),
                              "--home", str(tmp_path)])
    assert serve_cli.run(args) == 2
    assert "not a HiEdit checkpoint" in capsys.readouterr().err
    # the default (demo) editor, when it is not built, says how to build it
    monkeypatch.setattr(loading, "DEMO_HIEDIT", tmp_path / "demo-hiedit")
    args = parser.parse_args(["--model", str(standin_model_dir), "--editor", str(tmp_path / "demo-hiedit")])
    assert serve_cli.run(args) == 2
    err = capsys.readouterr().err
    assert "hiedit build-demo" in err and "--editor none" in err
    args = parser.parse_args(["--model", str(tmp_path / "no-model")])
    assert serve_cli.run(args) == 2 and "--model" in capsys.readouterr().err


def test_settings_read_hiedit_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HIEDIT_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("HIEDIT_PORT", "9001")
    monkeypatch.setenv("HIEDIT_HOME", str(tmp_path))
    s = Settings()
    assert s.resolved_database_url == "postgresql+psycopg://u@h/db" and s.port == 9001 and s.home == tmp_path
    monkeypatch.delenv("HIEDIT_DATABASE_URL")
    assert Settings().resolved_database_url == f"sqlite:///{tmp_path / 'hiedit.db'}"


class _SlowEditor:
    """Wraps an editor; its proposal blocks until the test lets it go."""

    method = "hiedit"

    def __init__(self, inner):
        self.inner, self.modules, self.cfg = inner, inner.modules, inner.cfg
        self.entered, self.release = threading.Event(), threading.Event()

    def propose(self, request, k=None):
        p = self.inner.propose(request, k)
        self.entered.set()
        assert self.release.wait(30)
        return p

    def commit(self, edit_id, proposal):
        pass

    def forget(self, edit_id, state_blob):
        pass

    def prepare_forget(self, edit_id, state_blob):
        return lambda: None

    def reset(self):
        pass

    def restore(self, edit_id, blob):
        pass


def test_generation_keeps_flowing_while_an_edit_is_proposed(tmp_path, standin_components):
    model, tok, editors, unavailable = standin_components
    slow = _SlowEditor(editors["hiedit"])
    with _client(tmp_path, (model, tok, {"hiedit": slow}, unavailable)) as c:
        wait_ready(c)
        before = c.get("/generate", params={"prompt": FACT1.prompt, "max_new_tokens": 2}).json()["text"]
        result = {}
        t = threading.Thread(target=lambda: result.update(r=_edit(c)))
        t.start()
        try:
            assert slow.entered.wait(30)
            # the writer is inside propose: reads are not blocked and still see the old weights
            r = c.get("/generate", params={"prompt": FACT1.prompt, "max_new_tokens": 2})
            assert r.status_code == 200 and r.json()["text"] == before
            assert c.get("/state").json()["active_edits"] == 0
        finally:
            slow.release.set()
            t.join(30)
        assert result["r"].status_code == 201
        assert c.get("/generate", params={"prompt": FACT1.prompt, "max_new_tokens": 2}).json()["text"] != before
