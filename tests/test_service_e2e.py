"""End to end against a real uvicorn process (``hiedit serve`` in a subprocess), on SQLite and Postgres.

Edit a fact -> /generate continues with the new target -> the audit lists every editable
module with exactly k selected -> rolling back brings back the fingerprint of before the edit
-> a crash (SIGKILL) and restart keep every edit, its status and the fingerprint -> rolling
back the rest restores the base fingerprint and the original answers.
"""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families



def _gen(c: httpx.Client, prompt: str, n: int = 3) -> str:
    r = c.get("/generate", params={"prompt": prompt, "max_new_tokens": n})
    assert r.status_code == 200, r.text
    body = r.json()
    assert 1 <= body["tokens"] <= n  # fewer when the model ends the text
    return body["text"]


def _state(c: httpx.Client) -> dict:
    r = c.get("/state")
    assert r.status_code == 200, r.text
    return r.json()


def _statuses(c: httpx.Client) -> dict[int, str]:
    return {e["id"]: e["status"] for e in c.get("/edits").json()["edits"]}


def test_edit_generate_audit_crash_restart_rollback(server_factory, database_url, e2e_assets):
    a = e2e_assets
    server = server_factory(*a.server_args, "--rlsedit", "off", "--database-url", database_url,
                            "--torch-threads", "1", "--probe-every-seconds", "0", "--probe-every-edits", "1")
    c = httpx.Client(base_url=server.url, timeout=120)
    fact1, fact2 = a.facts
    fp0 = _state(c)["fingerprint"]
    assert _state(c)["active_edits"] == 0
    original = _gen(c, fact1.prompt)
    assert not original.strip().startswith(fact1.target)  # the model does not know the new fact yet
    other_before = _gen(c, a.other_prompt, 8)
    probe = c.post("/probes", json={"prompt": a.other_prompt})
    assert probe.status_code == 201 and probe.json()["expected"] == other_before

    # 1. edit: 201 + Location, and generation now continues with the target
    r = c.post("/edits", json={"prompt": fact1.prompt, "target": fact1.target, "rephrases": list(fact1.rephrases)},
               headers={"Idempotency-Key": "e2e-edit-1"})
    assert r.status_code == 201, r.text
    edit1 = r.json()
    assert r.headers["location"] == f"/edits/{edit1['id']}"
    assert edit1["status"] == "applied" and edit1["method"] == "hiedit" and edit1["k"] == a.k
    assert edit1["efficacy"]["top1_before"] == 0.0 and edit1["efficacy"]["top1_after"] > 0.0
    assert _gen(c, fact1.prompt).strip().startswith(fact1.target)
    fp1 = _state(c)["fingerprint"]
    assert fp1 != fp0 and edit1["fingerprint_after"] == fp1

    # 2. audit: every editable module, exactly k selected, norms and ranks only where selected
    layers = c.get(f"/edits/{edit1['id']}/layers").json()
    assert layers["edit_id"] == edit1["id"] and layers["k"] == a.k
    mods = layers["layers"]
    assert [m["index"] for m in mods] == list(range(len(a.modules)))
    assert tuple(m["module"] for m in mods) == a.modules
    assert sum(m["selected"] for m in mods) == a.k
    assert all((m["delta_norm"] > 0 and m["rank"] >= 1) == m["selected"] for m in mods)
    assert sorted(m["module"] for m in mods if m["selected"]) == sorted(edit1["selected_layers"])
    chosen = [m for m in mods if m["selected"]]
    assert min(m["importance"] for m in chosen) >= max(m["importance"] for m in mods if not m["selected"])

    # 3. a second edit; then a crash (SIGKILL) and a restart keep both edits and the fingerprint
    r = c.post("/edits", json={"prompt": fact2.prompt, "target": fact2.target})
    assert r.status_code == 201, r.text
    edit2 = r.json()
    assert _gen(c, fact2.prompt).strip().startswith(fact2.target)
    fp2 = _state(c)["fingerprint"]
    report = c.get("/probes/report", params={"refresh": True}).json()
    assert report["active_edits"] == 2 and report["probes"] == 1 and report["fingerprint"] == fp2
    for e, fact in ((edit1, fact1), (edit2, fact2)):  # retention agrees with what /generate says
        kept = _gen(c, fact.prompt, 8).strip().startswith(fact.target)
        assert (e["id"] in report["lost_edits"]) == (not kept)
    assert report["specificity"] == (0.0 if report["changed_probes"] else 1.0)

    # 4. rolling back the newest edit brings back the fingerprint of before it
    r = c.post(f"/edits/{edit2['id']}/rollback")
    assert r.status_code == 200 and r.json()["status"] == "rolled_back" and r.json()["rolled_back_at"]
    assert _state(c)["fingerprint"] == fp1
    assert _gen(c, fact1.prompt).strip().startswith(fact1.target)
    assert c.post(f"/edits/{edit2['id']}/rollback").status_code == 409

    # 5. a crash (SIGKILL) and a restart keep every edit, its status and the fingerprint
    server.restart(crash=True)
    c = httpx.Client(base_url=server.url, timeout=120)
    st = _state(c)
    assert st["fingerprint"] == fp1 and st["active_edits"] == 1 and st["last_edit_id"] == edit2["id"]
    assert _statuses(c) == {edit1["id"]: "applied", edit2["id"]: "rolled_back"}
    assert _gen(c, fact1.prompt).strip().startswith(fact1.target)
    again = c.post("/edits", json={"prompt": fact1.prompt, "target": fact1.target,
                                   "rephrases": list(fact1.rephrases)}, headers={"Idempotency-Key": "e2e-edit-1"})
    assert again.status_code == 200 and again.json()["id"] == edit1["id"]  # idempotent across restarts
    assert _state(c)["fingerprint"] == fp1
    assert c.post(f"/edits/{edit2['id']}/rollback").status_code == 409

    # 6. rolling back the last edit restores W^0 exactly and the original answers
    r = c.post(f"/edits/{edit1['id']}/rollback")
    assert r.status_code == 200
    assert _state(c)["fingerprint"] == fp0 and _state(c)["active_edits"] == 0
    assert _gen(c, fact1.prompt) == original
    assert _gen(c, a.other_prompt, 8) == other_before
    assert c.get("/probes/report", params={"refresh": True}).json()["specificity"] == 1.0

    # 7. the metrics of DESIGN §6 are exported and parse
    fams = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    for name in ("hiedit_edits", "hiedit_edit_duration_seconds", "hiedit_rollbacks", "hiedit_active_edits",
                 "hiedit_generate_duration_seconds", "hiedit_generated_tokens", "hiedit_layer_selections",
                 "hiedit_probe_specificity_ratio", "hiedit_edit_retention_ratio"):
        assert name in fams, name
    assert fams["hiedit_active_edits"].samples[0].value == 0
    assert sum(s.value for s in fams["hiedit_generated_tokens"].samples if s.name.endswith("_total")) >= 3


BAD_EDITS = [
    ({}, "prompt"),
    ({"prompt": "The Eiffel Tower is in"}, "target"),
    ({"prompt": "The Eiffel Tower is in", "target": ""}, "target"),
    ({"prompt": "The Eiffel Tower is in", "target": " \t\n "}, "target"),
    ({"prompt": "   ", "target": "Rome"}, "prompt"),
    ({"prompt": 42, "target": "Rome"}, "prompt"),
    ({"prompt": "The Eiffel Tower is in", "target": ["Rome"]}, "target"),
    ({"prompt": "The Eiffel Tower is in", "target": "Rome", "rephrases": "x"}, "rephrases"),
    ({"prompt": "The Eiffel Tower is in", "target": "Rome", "rephrases": ["ok", ""]}, "rephrases"),
    ({"prompt": "The Eiffel Tower is in", "target": "Rome", "locality": [{"prompt": "x"}]}, "locality[0].target"),
    ({"prompt": "The Eiffel Tower is in", "target": "Rome", "method": "rome"}, "method"),
    ({"prompt": "The Eiffel Tower is in", "target": "Rome", "method": "rlsedit"}, "method"),  # off: 503
    ({"prompt": "The Eiffel Tower is in", "target": "Rome", "k": 0}, "k"),
    ({"prompt": "The Eiffel Tower is in", "target": "Rome", "k": 5}, "k"),
    ({"prompt": "The Eiffel Tower is in", "target": "Rome", "k": "2"}, "k"),
    ({"prompt": "The Eiffel Tower is in", "target": "Rome", "k": 1.5}, "k"),
    ({"prompt": "The Eiffel Tower is in " * 80, "target": "Rome"}, "prompt"),
    ({"prompt": "The Eiffel Tower is in", "target": "Rome", "rephrases": ["x " * 400]}, "rephrases[0]"),
    ({"prompt": "The Eiffel Tower is in", "target": "Rome", "colour": "blue"}, "colour"),
]


def test_bad_requests_get_4xx_naming_the_field_and_change_nothing(server_factory, tmp_path,
                                                                  standin_model_dir, standin_editor_dir):
    """Through real uvicorn (raw bytes, chunked bodies); the storage backend plays no part here."""
    server = server_factory("--model", str(standin_model_dir), "--editor", str(standin_editor_dir),
                            "--rlsedit", "off", "--torch-threads", "1",
                            "--probe-every-seconds", "0", "--max-body-bytes", "65536")
    c = httpx.Client(base_url=server.url, timeout=60)
    fp0 = _state(c)["fingerprint"]
    for body, field in BAD_EDITS:
        r = c.post("/edits", json=body)
        assert 400 <= r.status_code < 500 or (field == "method" and r.status_code == 503), (body, r.status_code, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, str) and field in detail, (body, detail)

    raw = [  # (request, expected status, field named)
        (dict(content=b'{"prompt": "The Eiffel \xff Tower", "target": "Rome"}'), 400, "body"),
        (dict(content=b'{"prompt": "The Eiffel Tower is in", "target": '), 422, "body"),
        (dict(content=b'["prompt", "target"]'), 422, "body"),
        (dict(content=b'{"prompt": "' + b"a" * 100_000 + b'", "target": "Rome"}'), 413, "body"),
    ]
    for kwargs, status, field in raw:
        r = c.post("/edits", headers={"content-type": "application/json"}, **kwargs)
        assert r.status_code == status and field in r.json()["detail"], (kwargs["content"][:60], r.status_code, r.text)

    def chunks():  # no Content-Length: the limit must still hold while streaming
        for _ in range(20):
            yield b"x" * 8192
    r = c.post("/edits", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body" in r.json()["detail"]

    gets = [("/generate?prompt=%FF%FE", 400, "prompt"), ("/generate", 422, "prompt"),
            ("/generate?prompt=hi&max_new_tokens=0", 422, "max_new_tokens"),
            ("/generate?prompt=hi&max_new_tokens=100000", 422, "max_new_tokens"),
            ("/generate?prompt=hi&max_new_tokens=abc", 422, "max_new_tokens"),
            ("/generate?prompt=hi&temperature=-1", 422, "temperature"),
            ("/generate?prompt=" + "word%20" * 600, 422, "prompt"),
            ("/edits/999", 404, "edit_id"), ("/edits/abc", 422, "edit_id"), ("/edits/999/layers", 404, "edit_id"),
            ("/edits?status=nope", 422, "status"), ("/edits?limit=0", 422, "limit")]
    for url, status, field in gets:
        r = c.get(url)
        assert r.status_code == status and field in r.json()["detail"], (url, r.status_code, r.text)
    for url, status, field in [("/edits/999/rollback", 404, "edit_id"), ("/edits/abc/rollback", 422, "edit_id")]:
        r = c.post(url)
        assert r.status_code == status and field in r.json()["detail"], (url, r.text)
    r = c.post("/generate", json={"prompt": "hi", "max_new_tokens": "many"})
    assert r.status_code == 422 and "max_new_tokens" in r.json()["detail"]
    r = c.post("/probes", json={"prompt": ""})
    assert r.status_code == 422 and "prompt" in r.json()["detail"]
    assert c.delete("/probes/999").status_code == 404
    r = c.post("/edits", json={"prompt": "hi", "target": "there"}, headers={"Idempotency-Key": "x" * 300})
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["detail"]

    assert _state(c)["fingerprint"] == fp0
    assert c.get("/edits").json()["total"] == 0  # nothing was logged either
    assert "ERROR" not in server.log_tail(500) and "Traceback" not in server.log_tail(500)
