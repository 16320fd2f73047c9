"""Scale-out (DESIGN §7) with real processes on loopback, the machine's Postgres and Redis:
one writer, two replicas, a late replica, a second writer that must refuse, a SIGKILLed writer.

Needs Postgres (HIEDIT_TEST_POSTGRES_URL) and Redis (HIEDIT_TEST_REDIS_URL); skipped when they
are unreachable, failed when HIEDIT_REQUIRE_SERVICES=1. Every run uses its own Postgres schema
and Redis key prefix, so parallel runs do not see each other.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REDIS_URL, REPO, STANDIN_OTHER_PROMPT, ServerProcess

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

LOCK_TTL_S = 3  # a SIGKILLed writer's lock is gone this long after its last renewal
TARGETS = ("Rome", "Dutch", "Paris", "London", "Tokyo")


def _state(server: ServerProcess) -> dict:
    r = httpx.get(server.url + "/state", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _lag_metric(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        if fam.name == "hiedit_replica_lag_edits":
            return fam.samples[0].value
    raise AssertionError("hiedit_replica_lag_edits is not exported")


def _converged(servers: list[ServerProcess], timeout: float) -> tuple[float, list[dict]]:
    """Seconds until every /state has the same fingerprint (or the timeout), and the last states."""
    t0 = time.monotonic()
    while True:
        states = [_state(s) for s in servers]
        print(f"  t={time.monotonic() - t0:.2f}s fingerprints {[s['fingerprint'][:8] for s in states]} "
              f"active {[s['active_edits'] for s in states]}")
        if len({s["fingerprint"] for s in states}) == 1 or time.monotonic() - t0 > timeout:
            return time.monotonic() - t0, states
        # not faster: on a loaded machine, polling /state hard takes the CPU the replicas need to sync
        time.sleep(0.2)


def test_writer_and_replicas_converge_survive_a_writer_crash_and_lose_nothing(
        standin_model_dir, standin_editor_dir, postgres_url, redis_prefix, tmp_path):
    prefix, redis_client = redis_prefix
    common = ["--model", str(standin_model_dir), "--editor", str(standin_editor_dir), "--rlsedit", "off",
              "--database-url", postgres_url, "--redis-url", REDIS_URL, "--probe-every-edits", "0",
              "--probe-every-seconds", "0", "--torch-threads", "1"]
    env = {"HIEDIT_REDIS_PREFIX": prefix, "HIEDIT_WRITER_LOCK_TTL_SECONDS": str(LOCK_TTL_S),
           "HIEDIT_REPLICA_POLL_SECONDS": "1", "HIEDIT_API_KEYS": ""}
    servers: list[ServerProcess] = []

    def start(role: str, *extra: str) -> ServerProcess:
        server = ServerProcess([*common, "--role", role, *extra], Path(tempfile.mkdtemp(dir=tmp_path)), env)
        servers.append(server)
        return server.start()

    try:
        writer = start("writer")
        replicas = [start("replica", "--writer-url", writer.url) for _ in range(2)]
        assert {_state(s)["fingerprint"] for s in [writer, *replicas]} == {_state(writer)["base_fingerprint"]}

        # a second writer refuses to start while the first holds the lock, and says why
        second = subprocess.run([sys.executable, "-m", "service.cli", "serve", *common, "--role", "writer",
                                 "--port", "0", "--home", str(tmp_path / "second")], cwd=REPO,
                                env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "another writer holds the writer lock" in second.stderr

        # 50 edits and 5 rollbacks through the writer
        acknowledged: list[int] = []
        with httpx.Client(base_url=writer.url, timeout=60) as c:
            for i in range(50):
                r = c.post("/edits", json={"prompt": f"Fact number {i} is about", "target": TARGETS[i % 5]},
                           headers={"Idempotency-Key": f"fact-{i}"})
                assert r.status_code == 201, r.text
                acknowledged.append(r.json()["id"])
            rolled = acknowledged[3::10]
            for edit_id in rolled:
                r = c.post(f"/edits/{edit_id}/rollback")
                assert r.status_code == 200, r.text
        assert len(rolled) == 5
        print(f"last rollback answered at {time.time():.3f}")
        # a bounded wait, not a speed claim: about 1 s on an idle machine (the time is printed; the replicas'
        # catch-up time is measured by bench/ and docs/benchmarks.md, not asserted on a loaded test machine)
        elapsed, states = _converged([writer, *replicas], timeout=60)
        print(f"converged after {elapsed:.3f}s")
        assert len({s["fingerprint"] for s in states}) == 1, (f"not converged after {elapsed:.1f}s", states)
        assert [s["active_edits"] for s in states] == [45, 45, 45]
        assert [s["role"] for s in states] == ["writer", "replica", "replica"]
        assert all(s["lag_edits"] == 0 for s in states[1:]) and all(_lag_metric(r) == 0 for r in replicas)
        fingerprint = states[0]["fingerprint"]
        assert fingerprint != states[0]["base_fingerprint"]

        # replicas serve what the writer serves, and send writes to the writer
        want = httpx.get(writer.url + "/generate", params={"prompt": "Fact number 7 is about",
                                                           "max_new_tokens": 3}).json()
        for replica in replicas:
            got = httpx.get(replica.url + "/generate", params={"prompt": "Fact number 7 is about",
                                                               "max_new_tokens": 3}).json()
            assert got == want
            r = httpx.post(replica.url + "/edits", json={"prompt": "x is", "target": "y"})
            assert r.status_code == 409
            assert r.json()["detail"] == f"this is a replica; send writes to the writer at {writer.url}"
            assert httpx.post(f"{replica.url}/edits/{acknowledged[0]}/rollback").status_code == 409
            assert httpx.post(replica.url + "/probes", json={"prompt": "x is"}).status_code == 409

        # a replica started after the edits catches up from the log alone
        late = start("replica", "--writer-url", writer.url)
        assert _state(late)["fingerprint"] == fingerprint and _state(late)["active_edits"] == 45

        # the writer dies without cleaning up: replicas keep serving
        writer.stop(crash=True)
        followers = [*replicas, late]
        for replica in followers:
            for _ in range(3):
                r = httpx.get(replica.url + "/generate", params={"prompt": STANDIN_OTHER_PROMPT, "max_new_tokens": 4})
                assert r.status_code == 200 and r.json()["tokens"] == 4, r.text
            assert _state(replica)["fingerprint"] == fingerprint
            assert httpx.get(replica.url + "/readyz").status_code == 200

        # its lock expires (nobody renews it), then a new writer starts on the same log
        t0 = time.monotonic()
        while redis_client.exists(f"{prefix}:writer") and time.monotonic() - t0 < LOCK_TTL_S + 5:
            time.sleep(0.1)
        assert not redis_client.exists(f"{prefix}:writer"), "the dead writer's lock did not expire"
        writer.start()
        log = httpx.get(writer.url + "/edits", params={"limit": 500}).json()
        status = {e["id"]: e["status"] for e in log["edits"]}
        assert set(acknowledged) <= set(status), sorted(set(acknowledged) - set(status))
        assert all(status[i] == ("rolled_back" if i in rolled else "applied") for i in acknowledged)
        assert _state(writer)["fingerprint"] == fingerprint

        # the restarted writer's changes reach the replicas again; a retried request is not a new edit
        with httpx.Client(base_url=writer.url, timeout=60) as c:
            again = c.post("/edits", json={"prompt": "Fact number 0 is about", "target": TARGETS[0]},
                           headers={"Idempotency-Key": "fact-0"})
            assert again.status_code == 200 and again.json()["id"] == acknowledged[0]
            assert c.post(f"/edits/{acknowledged[0]}/rollback").status_code == 200
        # (the 2-second bound is for the run above; here only convergence itself is required)
        elapsed, states = _converged([writer, *followers], timeout=60)
        assert len({s["fingerprint"] for s in states}) == 1, (elapsed, states)
        assert {s["active_edits"] for s in states} == {44}
    finally:
        for server in servers:
            server.stop()
