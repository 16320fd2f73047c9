"""The log -> weights direction: the replay at start, the sync after an uncertain write, and the checks that
refuse a log this server must not serve (another base model, unknown statuses, modules it does not edit).

An unreachable database is a 503 (``Unavailable``), never a hang or a 500: every write job first asks
:class:`service.db.Reachability` (``_check_log``, bounded in time) and answers 503 before any work. A write
whose commit fails may still have been committed (the answer was lost with the connection), so
``_writing_log`` then marks the log *uncertain*, and the next write job first re-reads the applied edits
and brings the weights in line (``_sync_with_log``, the same code that replays the log at start).
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from sqlalchemy import make_url

from editor_core.delta import LowRankDelta

from .. import crud, db
from ..models import EditStatus
from .errors import BaseModelMismatch, LogSettingsMismatch, Unavailable

log = logging.getLogger("hiedit.engine")


class ReplayMixin:
    """Part of :class:`service.engine.engine.EditEngine`: replay and sync with the log."""

    def _replay(self) -> int:
        """Apply every active edit of the log, in id order; then turn ready."""
        t0 = time.perf_counter()
        try:
            self.check_base_model()  # before anything is loaded or applied
            self.check_statuses()
            with self.sessions() as session:
                applied = crud.applied_edit_ids(session)
            held = self._load_editor_snapshots(set(applied))
            self._load_weights_checkpoint(applied, held)
            n = self._sync_with_log()
            self.ready = True
            log.info("replayed %d edits in %.2fs; fingerprint %s", n, time.perf_counter() - t0,
                     self.state.fingerprint()[:16])
            return n
        except Exception as e:
            self.startup_error = f"replaying the edit log failed: {e}"
            log.exception("replay failed")
            raise

    def check_statuses(self) -> None:
        """Refuse a log with a status the replay does not know: it would leave that edit out of the weights
        without a word. Migration 0004 refuses to upgrade such a log and its constraint keeps them out since;
        this is for a database whose constraint was dropped or never created."""
        with self.sessions() as session:
            bad = crud.invalid_statuses(session)
        if bad:
            shown = ", ".join(f"edit {i}: {s!r}" for i, s in bad)
            raise LogSettingsMismatch(f"the edit log has rows whose status is none of {', '.join(EditStatus.ALL)} "
                                      f"({shown}); fix them to what they are, then start again; nothing was "
                                      "replayed")

    def check_base_model(self, ids: list[int] | None = None) -> None:
        """BaseModelMismatch if the log (or its edits ``ids``) has edits made on another base model.

        An edit matches when its model name and base fingerprint are this server's; rows logged before
        migration 0003 have no fingerprint and are compared by name only. Runs before the replay (the
        app's lifespan also runs it first, so such a server never starts) and on a replica before it
        applies new edits of the log.
        """
        with self.sessions() as session:
            groups = crud.log_base_models(session, ids)
        foreign = [(model, fp, n) for model, fp, n in groups
                   if model != self.model_name or (fp is not None and fp != self.base_fingerprint)]
        if not foreign:
            return

        def fingerprint(fp: str | None) -> str:
            return f"fingerprint {fp[:12]}…" if fp else "no fingerprint recorded"

        url = make_url(self.settings.resolved_database_url).render_as_string(hide_password=True)
        written = " and ".join(f"{model!r} ({fingerprint(fp)}, {n} edit{'s' * (n != 1)})"
                               for model, fp, n in foreign[:3])
        more = f" and {len(foreign) - 3} other base models" if len(foreign) > 3 else ""
        model = foreign[0][0]
        fix = (f"start with --model {model}" if model != self.model_name else
               f"start with the weights of {model!r} the log was written for (this {model!r} has other weights)")
        raise BaseModelMismatch(
            f"the edit log at {url} was written for base model {written}{more}, but this server runs "
            f"{self.model_name!r} ({fingerprint(self.base_fingerprint)}): {fix}, or use another --database-url / "
            f"HIEDIT_HOME for this model; nothing was replayed")

    def _sync_with_log(self) -> int:
        """Make the active edits in memory exactly the log's ``applied`` edits, in id order.

        At start (nothing active) this is the replay. After a write whose commit may or may not
        have happened it repairs the one difference: an edit the log has and the weights lack, or
        the other way round. Edits newer than the oldest one to add are rolled back and re-applied,
        so the weights are always the id-ordered sum (DESIGN §3), as a fresh replay would build them.
        Returns the number of edits applied.
        """
        with self.sessions() as session:
            wanted = crud.applied_edit_ids(session)
        local = self.state.active_ids
        missing = set(wanted) - set(local)
        first_new = min(missing, default=None)
        drop = [i for i in reversed(local) if i not in set(wanted) or (first_new is not None and i > first_new)]
        add = [i for i in wanted if i in missing or i in set(drop)]
        if drop:
            blobs = self._state_blobs(drop)
            cannot_forget: set[str] = set()  # methods whose editor state is rebuilt from the log instead
            for edit_id in drop:
                self.state.rollback(edit_id, swap_lock=self.lock.write())
                method, blob = blobs.get(edit_id, ("", None))
                editor = self.editors.get(method)
                if editor is not None and method not in cannot_forget:
                    try:
                        editor.forget(edit_id, blob)
                    except ValueError as e:  # SingularSystemError, RLSStateMismatch: unlike a user's rollback,
                        # the log already says the edit is gone, so the editor's state is rebuilt without it
                        log.warning("log sync: the %s editor cannot forget edit %s (%s); rebuilding its state "
                                    "from the log", method, edit_id, e)
                        cannot_forget.add(method)
            for method in sorted(cannot_forget):
                self._rebuild_editor_state(method)
        applied = 0
        for rows in self.stored_edits(add):
            refused: dict[int, str] = {}
            deltas = []
            for edit, stored in rows:
                try:
                    deltas.append((edit.id, LowRankDelta.from_bytes(stored.blob).to(self.device)))
                except ValueError as e:  # not a delta at all
                    refused[edit.id] = str(e)
            self.check_modules_served(deltas)
            refused.update(self.state.apply_many(deltas, swap_lock=self.lock.write()))  # one swap per batch
            for edit, stored in rows:
                if edit.id in refused:
                    # The weights must match the log: an edit that cannot be applied is marked failed,
                    # which is what a fresh replica would conclude too.
                    log.error("replay: edit %s cannot be applied (%s); marking it failed", edit.id, refused[edit.id])
                    with self.sessions.begin() as session:
                        crud.set_status(session, edit.id, EditStatus.FAILED, error=f"replay: {refused[edit.id]}")
                    continue
                applied += 1
                editor = self.editors.get(edit.method)
                if editor is not None:
                    editor.restore(edit.id, stored.state_blob)
                else:
                    log.warning("replay: edit %s was made with %r, which this server cannot edit with; "
                                "its delta is applied, but new %s edits are refused", edit.id, edit.method,
                                edit.method)
        if drop or add:
            log.info("log sync: %d edits rolled back, %d applied", len(drop), applied)
        self.metrics.active_edits.set(len(self.state.active_ids))
        self._log_uncertain = False
        return applied

    def check_modules_served(self, deltas: list[tuple[int, LowRankDelta]]) -> None:
        """LogSettingsMismatch if applied edits change modules no editor of this server edits.

        Such an edit is sound; it was made under other editor settings (another layer spec, or
        RLSEdit's default layers before 3 Dec on models of <= 8 layers). Marking it failed, as a
        corrupted row is, would drop a user's edit because of a configuration change, so the server
        refuses to start instead and says which settings the log needs.
        """
        served = set(self.state.modules)
        foreign = {eid: sorted(set(d.modules) - served) for eid, d in deltas if not served.issuperset(d.modules)}
        if foreign:
            shown = "; ".join(f"edit {eid}: {', '.join(names)}" for eid, names in list(foreign.items())[:5])
            more = f" (and {len(foreign) - 5} more edits)" if len(foreign) > 5 else ""
            raise LogSettingsMismatch(
                f"the edit log has applied edits that change modules this server does not edit: {shown}{more}. "
                f"They were made under other editor settings; start with those (e.g. --rlsedit-layers for "
                f"RLSEdit, --editor for HiEdit) or roll the edits back from a server that has them. This "
                f"server edits: {', '.join(self.state.modules)}")

    def stored_edits(self, ids: list[int], batch: int = 100):
        """Lists of (Edit, EditDelta) of ``ids`` in id order, ``batch`` rows at a time (deltas can be large)."""
        for i in range(0, len(ids), batch):
            with self.sessions() as session:
                yield crud.edits_with_deltas(session, ids[i:i + batch])

    def _check_log(self, method: str | None) -> None:
        """503 before any work when the log cannot take a write; first repair an uncertain write."""
        if self.coordinator is not None and self.coordinator.regained != self._seen_regained:
            # the writer lock was lost and taken back: another writer may have appended meanwhile
            self._seen_regained, self._log_uncertain = self.coordinator.regained, True
        reason = self.reachability.check()
        if reason is None and self._log_uncertain:
            try:
                self._sync_with_log()
            except Exception as e:  # noqa: BLE001 - still uncertain; say why and retry on the next write
                if not db.is_unavailable(e):
                    raise
                reason = db.describe(e)
        if reason is not None:
            if method is not None:
                self.metrics.edits.labels(method=method, status="error").inc()
            raise Unavailable(f"database: the edit log is unreachable ({reason}); nothing was changed, "
                              "retry later")

    @contextlib.contextmanager
    def _writing_log(self, what: str, method: str | None, uncertain: bool = True) -> Iterator[None]:
        """Turn a lost database into a 503 naming what did not happen; a failed commit may have
        committed after all, so the next write first re-reads the log (``uncertain``)."""
        try:
            yield
        except Exception as e:
            if not db.is_unavailable(e):
                raise
            if uncertain:
                self._log_uncertain = True
            if method is not None:
                self.metrics.edits.labels(method=method, status="error").inc()
            raise Unavailable(f"database: {what} ({db.describe(e)}); retry later (with the same "
                              "Idempotency-Key, a retry never makes a second edit)") from None
