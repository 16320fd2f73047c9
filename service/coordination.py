"""What the processes of one deployment share through Redis (DESIGN §7).

* **The writer lock**: ``<prefix>:writer`` = a random token, ``SET NX PX ttl``, renewed by a
  heartbeat thread every ttl/3. A second writer refuses to start while the first lives; once a
  writer is SIGKILLed its lock expires after ``ttl`` and a new writer can start. A writer that
  cannot renew for longer than ``ttl`` (Redis gone) marks the lock lost and refuses edits (503)
  rather than risk two writers appending to the log; it keeps trying, and takes the lock back once
  Redis answers and nobody holds it (``regained`` counts that, and the engine then re-reads the log
  before its next write, in case another writer appended meanwhile). A writer that finds *another*
  holder on its key stops for good (restart it).
* **Idempotency keys**: ``<prefix>:idem:<key>`` = the edit id and request hash, for a day. The
  database's unique ``idempotency_key`` stays the authority; Redis is the shared fast path.
* **Change notifications**: ``PUBLISH <prefix>:changes {"kind": "applied"|"rolled_back", "edit_id"}``.
  Replicas also poll the log, so a lost message only delays them by one poll.

Postgres holds the log; nothing here is needed to rebuild the weights. Every Redis call is bounded
(1 s socket timeouts, one retry), and after a failure the optional calls (idempotency fast path,
notifications) are skipped for ``BREAKER_S`` seconds, so an unreachable Redis costs an edit
nothing but the fast paths (docs/reliability.md).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("hiedit.coordination")

IDEMPOTENCY_TTL_S = 24 * 3600
REDIS_TIMEOUT_S = 1.0  # connect and socket timeouts of every Redis call
BREAKER_S = 5.0        # after a failed optional call, skip the optional calls this long

# Renew / release only if we still hold the lock (another writer may have taken it after expiry).
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class WriterLockHeld(RuntimeError):
    """Another live writer holds the lock."""


class Coordinator:
    """Redis client for one process: writer lock, idempotency keys, change notifications."""

    def __init__(self, url: str, prefix: str = "hiedit", lock_ttl_s: float = 10.0):
        self.url = url
        self.prefix = prefix
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.redis = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                                          retry=Retry(NoBackoff(), 1))
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lock_held = False
        self.lock_lost = False
        self.lock_taken = False  # another process holds our key: never take it back
        self.regained = 0        # times the lock was taken back after an outage
        self._skip_until = 0.0   # optional calls are skipped until then (monotonic)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    @property
    def channel(self) -> str:
        return self.key("changes")

    def ping(self) -> None:
        self.redis.ping()

    # ---- writer lock ------------------------------------------------------------------------------

    def acquire_writer_lock(self) -> None:
        """Take the lock or raise WriterLockHeld naming the holder and when the lock would expire."""
        key = self.key("writer")
        if not self.redis.set(key, self.token, nx=True, px=self.lock_ttl_ms):
            holder = self.redis.get(key)
            ttl = self.redis.pttl(key)
            raise WriterLockHeld(
                f"another writer holds the writer lock {key!r} in Redis (holder {holder.decode() if holder else '?'}); "
                f"only one writer may run. If that writer is dead, its lock expires in {max(ttl, 0) / 1000:.1f} s; "
                "start replicas with --role replica")
        self.lock_held = True
        log.info("holding the writer lock %s (ttl %d ms)", key, self.lock_ttl_ms)
        self._spawn(self._heartbeat, "hiedit-writer-lock")

    def _heartbeat(self) -> None:
        key, last_ok = self.key("writer"), time.monotonic()
        while not self._stop.wait(self.lock_ttl_ms / 3000):
            try:
                renewed = self.redis.eval(_RENEW, 1, key, self.token, self.lock_ttl_ms)
                if renewed == 0 and self.lock_lost:  # lost in an outage: take it back if it is free
                    renewed = 1 if self.redis.set(key, self.token, nx=True, px=self.lock_ttl_ms) else 0
            except redis.RedisError as e:
                if not self.lock_lost:
                    log.warning("writer lock: cannot renew (%s)", e)
                renewed = None
            if renewed == 1:
                last_ok = time.monotonic()
                if self.lock_lost:
                    self.lock_lost, self.lock_held = False, True
                    self.regained += 1
                    log.warning("took the writer lock %s back: accepting edits again", key)
                continue
            if renewed == 0 and not self.lock_lost:
                # Someone else holds it: a second writer is live. Stop writing, for good.
                self.lock_lost, self.lock_held, self.lock_taken = True, False, True
                log.critical("another process holds the writer lock %s: this process refuses edits from now on; "
                             "restart it", key)
                return
            if not self.lock_lost and time.monotonic() - last_ok > self.lock_ttl_ms / 1000:
                # It may have expired: stop writing (another writer may start) until it is ours again.
                self.lock_lost, self.lock_held = True, False
                log.critical("could not renew the writer lock %s for %.1f s: refusing edits until Redis answers "
                             "and the lock is free again", key, self.lock_ttl_ms / 1000)

    def release_writer_lock(self) -> None:
        if self.lock_held:
            try:
                self.redis.eval(_RELEASE, 1, self.key("writer"), self.token)
            except redis.RedisError as e:
                log.warning("writer lock: cannot release (%s); it expires on its own", e)
            self.lock_held = False

    # ---- idempotency keys ---------------------------------------------------------------------------

    def _optional(self, what: str, call: Callable[[], object]) -> object | None:
        """Run an optional Redis call; on failure (or while the breaker is open) None, and the caller's
        fallback (the database, the replicas' polling) does the job."""
        if time.monotonic() < self._skip_until:
            return None
        try:
            return call()
        except redis.RedisError as e:
            self._skip_until = time.monotonic() + BREAKER_S
            log.warning("%s: Redis failed (%s); skipping Redis fast paths for %.0f s", what, e, BREAKER_S)
            return None

    def remember_idempotency(self, key: str, edit_id: int, request_hash: str) -> None:
        # the database still has it
        self._optional("idempotency key not stored", lambda: self.redis.set(
            self.key(f"idem:{key}"), json.dumps({"edit_id": edit_id, "request_hash": request_hash}),
            ex=IDEMPOTENCY_TTL_S))

    def recall_idempotency(self, key: str) -> dict | None:
        raw = self._optional("idempotency lookup (using the database)", lambda: self.redis.get(self.key(f"idem:{key}")))
        return json.loads(raw) if raw else None

    # ---- notifications ------------------------------------------------------------------------------

    def publish(self, kind: str, edit_id: int) -> None:
        """Tell replicas the log changed. Never raises: they poll the log anyway."""
        self._optional(f"notification {kind} {edit_id} not published",
                       lambda: self.redis.publish(self.channel, json.dumps({"kind": kind, "edit_id": edit_id})))

    def subscribe(self, on_message: Callable[[dict], None]) -> None:
        """Call ``on_message`` for every notification, on a thread, reconnecting after errors."""
        self._spawn(self._listen, "hiedit-notifications", on_message)

    def _listen(self, on_message: Callable[[dict], None]) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg and msg.get("type") == "message":
                        try:
                            on_message(json.loads(msg["data"]))
                        except (ValueError, TypeError) as e:
                            log.warning("ignoring a malformed notification %r: %s", msg.get("data"), e)
            except redis.RedisError as e:
                log.warning("notifications: %s; reconnecting (the replica keeps polling the log)", e)
                self._stop.wait(1.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except redis.RedisError:
                        pass

    # ---- lifecycle ------------------------------------------------------------------------------

    def _spawn(self, target: Callable, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.release_writer_lock()
        self.redis.close()
