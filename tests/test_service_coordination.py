"""The Redis side of scale-out, in-process: the writer lock (refused, renewed, expired, lost),
idempotency keys shared between processes, and change notifications."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import REDIS_URL
from service.coordination import Coordinator, WriterLockHeld

pytestmark = pytest.mark.redis



@pytest.fixture
def prefix(redis_prefix):
    return redis_prefix[0]


def test_writer_lock_is_exclusive_renewed_and_released(prefix):
    first, second = Coordinator(REDIS_URL, prefix, 2.0), Coordinator(REDIS_URL, prefix, 2.0)
    try:
        first.acquire_writer_lock()
        time.sleep(3.0)  # longer than the ttl: only the heartbeat keeps it
        with pytest.raises(WriterLockHeld, match="another writer holds the writer lock"):
            second.acquire_writer_lock()
        assert first.lock_held and not first.lock_lost
        first.close()  # a clean shutdown releases at once
        second.acquire_writer_lock()
    finally:
        first.close()
        second.close()


def test_a_writer_that_loses_its_lock_refuses_writes(prefix, tmp_path, standin_components):
    from fastapi.testclient import TestClient

    from service.main import create_app
    from service.settings import Settings

    coord = Coordinator(REDIS_URL, prefix, 3.0)  # renewed every second; a busy test process still makes it
    coord.acquire_writer_lock()
    settings = Settings(home=tmp_path, rlsedit="off", torch_threads=1, probe_every_seconds=0, probe_every_edits=0,
                        redis_url=REDIS_URL, redis_prefix=prefix)
    with TestClient(create_app(settings, standin_components, coordinator=coord)) as c:
        for _ in range(200):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert c.post("/edits", json={"prompt": "The Eiffel Tower is in", "target": "Rome"}).status_code == 201
        coord.redis.set(f"{prefix}:writer", "someone-else", px=5000)  # e.g. it expired and another writer took it
        t0 = time.monotonic()
        while not coord.lock_lost and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        r = c.post("/edits", json={"prompt": "The Eiffel Tower is in", "target": "Rome"})
        assert r.status_code == 503 and "lost its Redis writer lock" in r.json()["detail"]
    assert coord.redis.get(f"{prefix}:writer") == b"someone-else"  # never releases a lock it does not hold


def test_idempotency_keys_and_notifications_cross_processes(prefix):
    writer, reader = Coordinator(REDIS_URL, prefix), Coordinator(REDIS_URL, prefix)
    got: list[dict] = []
    arrived = threading.Event()

    def on_message(msg: dict) -> None:
        got.append(msg)
        if len(got) == 2:
            arrived.set()
    try:
        writer.remember_idempotency("k1", 7, "abc")
        assert reader.recall_idempotency("k1") == {"edit_id": 7, "request_hash": "abc"}
        assert reader.recall_idempotency("k2") is None
        reader.subscribe(on_message)
        time.sleep(0.5)  # the subscription is live
        writer.publish("applied", 8)
        writer.publish("rolled_back", 7)
        assert arrived.wait(5), got
        assert got == [{"kind": "applied", "edit_id": 8}, {"kind": "rolled_back", "edit_id": 7}]
    finally:
        writer.close()
        reader.close()
