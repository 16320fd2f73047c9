"""A serving replica (DESIGN §7): the writer's log, applied, never recomputed.

The replica loads the same model and editor configuration as the writer (the editors name the
editable modules, which the fingerprint covers) but never proposes an edit. It converges on the
log by a *sync*: read the ids of the applied edits, roll back what is active here but no longer
applied there (``WeightState.rollback``), then apply the stored deltas of the new ones in id
order. A sync runs at start, on every Redis notification, and every ``replica_poll_seconds``, so
a replica that started late or missed a message catches up from the database alone.

Syncs run on the engine's writer thread, like edits on the writer: the weights change one swap
at a time under the write lock, and generation sees whole states only. Every state a replica
passes through is the writer's state for some set of active edits, applied in id order, so the
fingerprints are equal once the replica has caught up (DESIGN §3: same active edits, same bytes).

That equality is checked, not assumed. After every sync the replica compares its fingerprint with the
one the writer recorded for the log's current state (``service.verify``): ``fingerprint_after`` of the
newest edit, or ``fingerprint_rolled_back`` of the newest rollback. A follower that applies edits as
they are logged so checks each one; a catch-up of many edits checks the state it ends in and, if that
differs, replays the edits one by one to find the first that differs. On a mismatch the replica goes
back to the last state that matched (the edits before the first that differs), stops following the log
and stops reporting ready: ``/readyz`` answers 503 naming the edit and both fingerprints, the log says
the same at ERROR, and ``hiedit_replica_fingerprint_mismatch`` is 1 (alert HieditReplicaFingerprintMismatch).
It keeps answering ``/generate`` from that last verified state, which is the writer's state of a moment
ago, until it is restarted: a replica whose arithmetic differs from the writer's would differ again on
the next edit, so retrying in place only hides it.
"""
from __future__ import annotations

import logging
import threading
import time

from prometheus_client import Gauge
from sqlalchemy import select

from editor_core.delta import LowRankDelta

from . import crud, verify
from .coordination import Coordinator
from .engine import EditEngine
from .engine.errors import Conflict
from .models import EditDelta, EditStatus

log = logging.getLogger("hiedit.replica")


class ReplicaEngine(EditEngine):
    """An EditEngine that follows the log instead of writing it."""

    def __init__(self, *args, coordinator: Coordinator | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.coordinator = coordinator
        self.lag = 0                 # changes in the log not applied here, as of the last read
        self.applied_last_id: int | None = None
        self.unappliable: dict[int, str] = {}  # edit id -> why its stored delta cannot be applied here
        self.lag_gauge = Gauge("hiedit_replica_lag_edits", "Changes of the edit log (edits applied or rolled "
                               "back by the writer) this replica has not applied yet", registry=self.metrics.registry)
        self.mismatch_gauge = Gauge("hiedit_replica_fingerprint_mismatch", "1 when this replica's weights differed "
                                    "from the writer's recorded fingerprint of the same state (it then serves the "
                                    "last state that matched and is not ready); 0 otherwise",
                                    registry=self.metrics.registry)
        self.mismatch_gauge.set(0)
        self.verified: verify.Expected | None = None   # the newest writer state this replica matched
        self.mismatch: dict | None = None              # set once: the state that differed, both fingerprints
        self._unverifiable_noted: set[tuple[str, int]] = set()
        # edits applied on top of the last verified state since it was verified (None: that state was taken
        # apart by a rollback or a rebuild): what a mismatch replays one by one to find the edit that differs
        self._since_verified: list[int] | None = []
        self._wake = threading.Event()
        self._follower = threading.Thread(target=self._follow, name="hiedit-replica-follower", daemon=True)

    # ---- writes are the writer's ----------------------------------------------------------------

    def _refuse(self, *_args, **_kwargs):
        where = self.settings.writer_url or "(HIEDIT_WRITER_URL is not set)"
        raise Conflict(f"this is a replica; send writes to the writer at {where}")

    submit_edit = submit_rollback = add_probe = _refuse

    def _save_editor_snapshots(self) -> None:
        """Nothing to save: a replica's editors never commit an edit."""

    # ---- following the log ------------------------------------------------------------------------

    def _replay(self) -> int:
        """First job of the writer thread: catch up with the log, turn ready, then follow it."""
        t0 = time.perf_counter()
        try:
            self.check_base_model()  # the writer's check: a log of another base model is never applied
            changed = self._sync()
        except Exception as e:
            self.startup_error = f"reading the edit log failed: {e}"
            log.exception("initial sync failed")
            raise
        self.ready = True
        log.info("replica caught up with %d changes in %.2fs; fingerprint %s", changed, time.perf_counter() - t0,
                 self.state.fingerprint()[:16])
        if self.coordinator is not None:
            self.coordinator.subscribe(self._on_notification)
        self._follower.start()
        return changed

    def _on_notification(self, message: dict) -> None:
        self._wake.set()

    def _follow(self) -> None:
        every = self.settings.replica_poll_seconds
        while not self._stop.is_set():
            self._wake.wait(every)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._submit(self._sync).result()
            except Exception as e:  # the database may be away for a while: keep serving, retry next poll
                log.warning("sync with the edit log failed (retrying in %.1fs): %s", every, e)

    def _sync(self) -> int:
        """Make the active edits here those of the log, then verify them; returns the number of changes applied."""
        t0 = time.perf_counter()
        with self.sessions() as session:
            rows = crud.log_rows(session)  # one statement: the wanted edits and the fingerprints agree
        wanted = [r.id for r in rows if r.status == EditStatus.APPLIED]
        self.unappliable = {i: why for i, why in self.unappliable.items() if i in set(wanted)}
        local = set(self.state.active_ids)
        drop = sorted(local - set(wanted), reverse=True)
        add = [i for i in wanted if i not in local and i not in self.unappliable]
        self._set_lag(len(drop) + len(add))
        if self.mismatch is not None:  # frozen at the last verified state until a restart (module docstring)
            return 0
        if not drop and not add:
            self._verify(rows, wanted)  # the writer may have recorded the fingerprint after our last sync
            return 0
        if add:  # edits a writer on another base model logged after this replica started: not applied
            self.check_base_model(add)
        keep = local - set(drop)
        rebuild = bool(add and keep and min(add) < max(keep))  # an older edit came back: rebuild in id order
        deltas = self._load_deltas([i for i in wanted if i not in self.unappliable] if rebuild else add)
        if rebuild:
            with self.lock.write():  # one swap for the whole rebuild: readers never see the partial state
                self.state.reset()
                self._note_unappliable(self.state.apply_many(sorted(deltas.items())))
        else:
            for n, i in enumerate(drop, 1):
                self.state.rollback(i, swap_lock=self.lock.write())
                self._set_lag(len(drop) + len(add) - n)
            # the new edits in one swap (the same bytes as one by one: service.weights)
            self._note_unappliable(self.state.apply_many(sorted(deltas.items()), swap_lock=self.lock.write()))
        changed = len(drop) + len(add)
        self._set_lag(0)
        self.applied_last_id = max(self.state.active_ids, default=None)
        self.metrics.active_edits.set(len(self.state.active_ids))
        log.info("applied %d changes of the log (%d rolled back%s) in %.3fs; %d edits active", changed, len(drop),
                 ", rebuilt" if rebuild else "", time.perf_counter() - t0, len(self.state.active_ids))
        if rebuild or drop or self._since_verified is None:
            self._since_verified = None
        else:
            self._since_verified.extend(add)
        self._verify(rows, wanted)
        return changed

    # ---- verifying against the writer's fingerprints -------------------------------------------------

    def _verify(self, rows: list[crud.LogRow], wanted: list[int]) -> None:
        """Compare the served weights with the writer's fingerprint of the log's current state."""
        if self.unappliable or self.state.active_ids != wanted:
            return  # not at a state of the writer: the lag says so already
        expected = verify.last_state(rows, wanted, self.state.fingerprint_scheme)
        if expected is None:
            return  # no edit was ever applied: the base weights, which the base model check covers
        if expected.fingerprint is None:
            key = (expected.event, expected.edit_id)
            if key not in self._unverifiable_noted and "not recorded" not in (expected.why_not or ""):
                self._unverifiable_noted.add(key)
                log.warning("%s: not verified: %s", expected.describe(), expected.why_not)
            return  # "not recorded (yet)": the writer notifies again once it has, and the poll re-reads it
        got = self.state.fingerprint()
        if got == expected.fingerprint:
            self.verified, self._since_verified = expected, []
            return
        first = self._first_differing_edit(rows, wanted, self._since_verified or [])
        self._diverged(first or expected, expected, got, wanted, went_back=first is not None)

    def _first_differing_edit(self, rows: list[crud.LogRow], wanted: list[int],
                              added: list[int]) -> verify.Expected | None:
        """Replay edits one by one, checking each against the writer's state after it, and stop before the
        first that differs; None when each matched (the difference is in a rollback).

        ``added``: the edits applied on top of the last verified state since; they are taken off again
        (a rollback rebuilds the same bytes in this process) and replayed. Otherwise every applied edit is
        replayed from W⁰. One swap for the whole replay: readers see the state before it or the one it
        leaves, not the intermediate ones. Runs only after a mismatch."""
        checks = verify.edit_states(rows, wanted, self.state.fingerprint_scheme)
        replay = added if added and self.verified is not None else wanted
        deltas = self._load_deltas(replay)
        with self.lock.write():
            if replay is wanted:
                self.state.reset()
            else:
                for edit_id in sorted(replay, reverse=True):
                    self.state.rollback(edit_id)
            for edit_id in replay:
                self.state.apply(edit_id, deltas[edit_id].to(self.device))
                want = checks.get(edit_id)
                if want is None or want.fingerprint is None:
                    continue
                got = self.state.fingerprint()
                if got != want.fingerprint:
                    self.state.rollback(edit_id)  # serve the last state that matched the writer's
                    self.metrics.active_edits.set(len(self.state.active_ids))
                    self.mismatch = {"edit_id": edit_id, "event": "edit", "expected_fingerprint": want.fingerprint,
                                     "fingerprint": got}
                    return want
                self.verified = want
        return None

    def _diverged(self, first: verify.Expected, newest: verify.Expected, got_newest: str, wanted: list[int],
                  went_back: bool) -> None:
        if not went_back:  # every edit's own state matched: the difference is in the newest state, which is kept
            self.mismatch = {"edit_id": first.edit_id, "event": first.event,
                             "expected_fingerprint": first.fingerprint, "fingerprint": got_newest}
        m = self.mismatch
        self.mismatch_gauge.set(1)
        self.applied_last_id = max(self.state.active_ids, default=None)
        self._set_lag(len(set(wanted) ^ set(self.state.active_ids)))
        if went_back:
            served = f"serving the edits before edit {m['edit_id']}"
            if self.verified is not None:
                served += f" (the newest state it verified: {self.verified.describe()})"
        else:
            served = "serving the state the log names, unverified"

        self.mismatch["detail"] = (
            f"the weights after {first.describe()} differ from the writer's: fingerprint {m['fingerprint']}, "
            f"the writer recorded {m['expected_fingerprint']}. This replica computes other bytes than the writer "
            f"(see docs/operations.md#hieditreplicafingerprintmismatch); it stopped following the log and is "
            f"{served}; restart it once the cause is fixed")
        log.error("replica fingerprint mismatch: %s (newest state of the log: %s)", m["detail"], newest.describe())

    def _load_deltas(self, ids: list[int]) -> dict[int, LowRankDelta]:
        if not ids:
            return {}
        with self.sessions() as session:
            rows = session.execute(select(EditDelta.edit_id, EditDelta.blob).where(EditDelta.edit_id.in_(ids))).all()
        return {edit_id: LowRankDelta.from_bytes(blob) for edit_id, blob in rows}

    def _note_unappliable(self, refused: dict[int, str]) -> None:
        for edit_id, why in refused.items():
            # The writer applied it, so this should not happen; never retry it in a loop, say so.
            self.unappliable[edit_id] = why
            log.error("edit %s: the stored delta cannot be applied on this replica: %s", edit_id, why)

    def _set_lag(self, n: int) -> None:
        self.lag = n + len(self.unappliable)
        self.lag_gauge.set(self.lag)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()  # before waking the follower, so it exits instead of queueing another sync
        self._wake.set()
        super().stop(timeout)
