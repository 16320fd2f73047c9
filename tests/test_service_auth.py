"""DESIGN §4 auth on the app: the scope matrix, the actor of edits and rollbacks, the edit rate
limit, and the loopback rule of an open server (in-process TestClient on SQLite)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from conftest import REPO, STANDIN_FACTS, app_settings, wait_ready
from service.main import create_app

FACT1, FACT2 = STANDIN_FACTS
KEYS = {"read": "reader-secret-1", "edit": "editor-secret-2", "admin": "admin-secret-3"}
API_KEYS = f"read:{KEYS['read']},edit:alice={KEYS['edit']},admin:{KEYS['admin']}"
RANK = {"read": 0, "edit": 1, "admin": 2}


def _auth(scope: str | None) -> dict:
    return {"Authorization": f"Bearer {KEYS[scope]}"} if scope else {}


def _message(r) -> str:
    """The error text: ``detail``, or ``error.message`` on the OpenAI-compatible routes."""
    body = r.json()
    if r.request.url.path.startswith("/v1/"):
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return body["error"]["message"]
    return body["detail"]


def _endpoints(c: TestClient) -> list[tuple[str, str, str | None, dict, int]]:
    """(method, path, scope needed, request kwargs, status when allowed). Every id named here
    exists and every body is valid, so a missing check would show as a success, not a 404/422."""
    admin = _auth("admin")
    model = c.get("/v1/models", headers=admin).json()["data"][0]["id"]
    edit_id = c.post("/edits", json={"prompt": FACT1.prompt, "target": FACT1.target}, headers=admin).json()["id"]
    return [
        ("POST", "/edits", "edit", {"json": {"prompt": FACT2.prompt, "target": FACT2.target}}, 201),
        ("GET", "/edits", "read", {}, 200),
        ("GET", f"/edits/{edit_id}", "read", {}, 200),
        ("GET", f"/edits/{edit_id}/layers", "read", {}, 200),
        ("POST", "/edits/{new_edit}/rollback", "edit", {}, 200),
        ("GET", "/generate", "read", {"params": {"prompt": FACT1.prompt, "max_new_tokens": 2}}, 200),
        ("POST", "/generate", "read", {"json": {"prompt": FACT1.prompt, "max_new_tokens": 2}}, 200),
        ("POST", "/v1/completions", "read", {"json": {"model": model, "prompt": FACT1.prompt, "max_tokens": 2}}, 200),
        ("POST", "/v1/chat/completions", "read",
         {"json": {"model": model, "messages": [{"role": "user", "content": FACT1.prompt}], "max_tokens": 2}}, 200),
        ("GET", "/v1/models", "read", {}, 200),
        ("POST", "/export", "admin", {"json": {"format": "peft"}}, 200),
        ("POST", "/probes", "admin", {"json": {"prompt": FACT1.prompt}}, 201),
        ("GET", "/probes", "admin", {}, 200),
        ("DELETE", "/probes/{new_probe}", "admin", {}, 204),
        ("GET", "/probes/report", "read", {}, 200),
        ("GET", "/state", "read", {}, 200),
        ("GET", "/healthz", None, {}, 200),
        ("GET", "/readyz", None, {}, 200),
        ("GET", "/metrics", None, {}, 200),
    ]


def test_auth_matrix_every_endpoint_every_scope(tmp_path, standin_components):
    """Exactly what DESIGN §4 implies: 401 without a key, 403 below the scope, the route's own status else."""
    standin_components[1].chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    app = create_app(app_settings(tmp_path, api_keys=API_KEYS), standin_components)
    with TestClient(app) as c:
        wait_ready(c)
        endpoints = _endpoints(c)
        # every route of the app is in the matrix: a new endpoint cannot ship without its auth check
        routes = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}
        listed = {(m, re.sub(r"/edits/(\d+|\{new_edit\})", "/edits/{edit_id}", t).replace("{new_probe}", "{probe_id}"))
                  for m, t, *_ in endpoints}
        assert routes <= listed, sorted(routes - listed)
        admin = _auth("admin")
        got, want = {}, {}
        for caller in (None, "read", "edit", "admin"):
            for method, template, needed, kwargs, ok in endpoints:
                path = template
                # fresh targets for the destructive routes, created by the admin, so a success is a real one
                if "{new_edit}" in path:
                    new = c.post("/edits", json={"prompt": FACT2.prompt, "target": FACT2.target}, headers=admin)
                    path = path.format(new_edit=new.json()["id"])
                if "{new_probe}" in path:
                    path = path.format(new_probe=c.post("/probes", json={"prompt": FACT2.prompt},
                                                        headers=admin).json()["id"])
                r = c.request(method, path, headers=_auth(caller), **kwargs)
                key = (method, template, caller)
                got[key] = r.status_code
                if needed is None:
                    want[key] = ok
                elif caller is None:
                    want[key] = 401
                    assert r.headers.get("www-authenticate") == "Bearer", (key, r.headers)
                    assert _message(r).startswith("Authorization:"), r.text
                elif RANK[caller] < RANK[needed]:
                    want[key] = 403
                    assert f"needs {needed!r}" in _message(r), r.text
                else:
                    want[key] = ok
        mismatches = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        assert not mismatches, mismatches
        # a key that is not configured, and a malformed header, are 401 too
        for header in ("Bearer not-a-configured-key", "Basic " + KEYS["admin"], KEYS["admin"]):
            r = c.get("/state", headers={"Authorization": header})
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (header, r.text)


def test_actor_of_edits_and_rollbacks_is_the_key_name_or_hash(tmp_path, standin_components):
    app = create_app(app_settings(tmp_path, api_keys=API_KEYS), standin_components)
    with TestClient(app) as c:
        wait_ready(c)
        r = c.post("/edits", json={"prompt": FACT1.prompt, "target": FACT1.target}, headers=_auth("edit"))
        assert r.status_code == 201 and r.json()["actor"] == "alice"
        rolled = c.post(f"/edits/{r.json()['id']}/rollback", headers=_auth("admin"))
        assert rolled.status_code == 200, rolled.text
        import hashlib
        admin_actor = "key-" + hashlib.sha256(KEYS["admin"].encode()).hexdigest()[:8]
        rec = c.get(f"/edits/{r.json()['id']}", headers=_auth("read")).json()
        assert rec["actor"] == "alice" and rec["rolled_back_by"] == admin_actor and rec["status"] == "rolled_back"


def test_open_server_is_anonymous_admin(tmp_path, standin_components):
    with TestClient(create_app(app_settings(tmp_path), standin_components)) as c:
        wait_ready(c)
        r = c.post("/edits", json={"prompt": FACT1.prompt, "target": FACT1.target})
        assert r.status_code == 201 and r.json()["actor"] == "anonymous"
        assert c.post(f"/edits/{r.json()['id']}/rollback").json()["rolled_back_by"] == "anonymous"
        assert c.get("/probes").status_code == 200


def test_edit_rate_limit_is_per_key_with_retry_after(tmp_path, standin_components):
    app = create_app(app_settings(tmp_path, api_keys=API_KEYS, edit_rate_per_second=0.2, edit_burst=2),
                     standin_components)
    body = {"prompt": FACT1.prompt, "target": FACT1.target}
    with TestClient(app) as c:
        wait_ready(c)
        statuses = [c.post("/edits", json=body, headers=_auth("edit")).status_code for _ in range(3)]
        assert statuses == [201, 201, 429]
        r = c.post("/edits", json=body, headers=_auth("edit"))
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 5, r.headers
        assert "HIEDIT_EDIT_RATE_PER_SECOND" in r.json()["detail"]
        # another key has its own bucket; reads are not limited
        assert c.post("/edits", json=body, headers=_auth("admin")).status_code == 201
        assert c.get("/edits", headers=_auth("edit")).json()["total"] == 3


def test_token_and_body_limits_are_configurable(tmp_path, standin_components):
    app = create_app(app_settings(tmp_path, max_target_tokens=1, max_prompt_tokens=8, max_body_bytes=2048),
                     standin_components)
    with TestClient(app) as c:
        wait_ready(c)
        r = c.post("/edits", json={"prompt": FACT1.prompt, "target": "Rome and Paris"})
        assert r.status_code == 422 and r.json()["detail"].startswith("target: ") and "limit of 1" in r.json()["detail"]
        r = c.post("/edits", json={"prompt": "one two three four five six seven eight nine ten", "target": "Rome"})
        assert r.status_code == 422 and r.json()["detail"].startswith("prompt: ") and "limit of 8" in r.json()["detail"]
        r = c.post("/edits", json={"prompt": FACT1.prompt, "target": "x" * 4000})
        assert r.status_code == 413 and "HIEDIT_MAX_BODY_BYTES" in r.json()["detail"]
        assert c.get("/edits").json()["total"] == 0


def test_malformed_api_keys_refuse_to_build_the_app(tmp_path):
    from service.api.security import AuthConfigError

    with pytest.raises(AuthConfigError, match="shorter than 8"):
        create_app(app_settings(tmp_path, api_keys="edit:short"))


@pytest.mark.parametrize("host,keys,words", [("0.0.0.0", None, "refusing to bind 0.0.0.0"),
                                             ("127.0.0.1", "admin:tiny", "shorter than 8")])
def test_serve_refuses_open_non_loopback_bind_and_bad_keys(tmp_path, host, keys, words):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIEDIT_")}
    if keys:
        env["HIEDIT_API_KEYS"] = keys
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--host", host, "--home", str(tmp_path),
                           "--model", str(tmp_path / "no-model")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and "HIEDIT_API_KEYS" in done.stderr
