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
"""
from __future__ import annotations

import logging
import threading
import time

from prometheus_client import Gauge
from sqlalchemy import select

from editor_core.delta import LowRankDelta

from . import crud
from .coordination import Coordinator
from .engine import Conflict, EditEngine
from .models import EditDelta

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
        """Make the active edits here those of the log; returns the number of changes applied."""
        t0 = time.perf_counter()
        with self.sessions() as session:
            wanted = crud.applied_edit_ids(session)
        self.unappliable = {i: why for i, why in self.unappliable.items() if i in set(wanted)}
        local = set(self.state.active_ids)
        drop = sorted(local - set(wanted), reverse=True)
        add = [i for i in wanted if i not in local and i not in self.unappliable]
        self._set_lag(len(drop) + len(add))
        if not drop and not add:
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
        return changed

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
