"""The rollback job: log the rollback, rebuild the touched modules without the edit, let the editor forget it.

The weights are rebuilt by ``ServedWeights.rollback`` (``service.weights``: from the newest checkpoint older than
the edit, or W⁰, plus the remaining deltas in id order); this job decides when, and keeps the log in step.
"""
from __future__ import annotations

import logging

from .. import crud, db
from ..models import Edit, EditStatus, utcnow
from ..verify import active_digest
from .errors import Conflict, EngineError, NotFound

log = logging.getLogger("hiedit.engine")


class RollbackMixin:
    """Part of :class:`service.engine.engine.EditEngine`: the rollback job."""

    def _rollback_job(self, edit_id: int, actor: str = "anonymous") -> Edit:
        self._require_ready()
        self._check_log(None)
        with self._writing_log(f"edit {edit_id} could not be read", None, uncertain=False), \
                self.sessions() as session:
            edit = crud.get_edit(session, edit_id)
            # read now: the editor forgets the edit's keys after the rollback, when the log may be unreachable
            state_blob = crud.state_blobs(session, [edit_id]).get(edit_id, ("", None))[1]
        if edit is None:
            raise NotFound(f"edit_id: no edit {edit_id}")
        if edit.status == EditStatus.ROLLED_BACK:
            raise Conflict(f"edit_id: edit {edit_id} is already rolled back")
        if edit.status != EditStatus.APPLIED:
            raise Conflict(f"edit_id: edit {edit_id} is {edit.status}: only applied edits can be rolled back")
        editor = self.editors.get(edit.method)
        forget = None
        if editor is not None:
            # Asked before anything changes: once the weights are rolled back, an editor that cannot forget
            # the edit (RLSEdit's downdate singular to working precision, or keys in the log that are not
            # the ones it committed) would leave its state holding an edit the weights no longer have.
            try:
                forget = editor.prepare_forget(edit_id, state_blob)
            except ValueError as e:  # SingularSystemError, RLSStateMismatch
                raise Conflict(f"edit_id: edit {edit_id} cannot be rolled back: the {edit.method} editor "
                               f"cannot forget it ({e}); nothing changed") from e
        # Log first, as for edits: if the process dies right after, the replay leaves the edit out.
        with self._writing_log(f"the rollback of edit {edit_id} could not be logged, so it was not made",
                               edit.method), self.sessions.begin() as session:
            crud.set_status(session, edit_id, EditStatus.ROLLED_BACK)
            session.get(Edit, edit_id).rolled_back_by = actor
        try:
            self.state.rollback(edit_id, swap_lock=self.lock.write())
        except Exception as e:
            with self._writing_log(f"the rollback of edit {edit_id} failed ({e}) and putting the log back "
                                   "did not succeed", edit.method), \
                    self.sessions.begin() as session:  # weights unchanged: put the log back as it was
                row = session.get(Edit, edit_id)
                row.status, row.rolled_back_at, row.rolled_back_by = EditStatus.APPLIED, None, None
            raise EngineError(f"rollback of edit {edit_id} failed, nothing changed: {e}", 500) from e
        try:  # before the notification, so a replica that syncs on it can verify the state at once
            with self.sessions.begin() as session:
                row = session.get(Edit, edit_id)
                row.fingerprint_rolled_back = self.state.fingerprint()
                row.active_digest_rolled_back = active_digest(self.state.active_ids)
        except Exception as e:  # noqa: BLE001 - the rollback stands; replicas only cannot verify this state
            if not db.is_unavailable(e):
                raise
            log.warning("rollback of edit %s: the fingerprint after it was not stored (%s); replicas cannot "
                        "verify this state", edit_id, db.describe(e))
        self._notify("rolled_back", edit_id)
        if forget is not None:
            forget()  # computed above, on the state it applies to: this writer is the only one that changes it
        self.metrics.rollbacks.inc()
        self.metrics.edits.labels(method=edit.method, status="rolled_back").inc()
        self.metrics.active_edits.set(len(self.state.active_ids))
        self._edits_since_report += 1
        self._changes_since_snapshot += 1
        try:
            with self.sessions() as session:
                return crud.get_edit(session, edit_id)
        except Exception as e:
            if not db.is_unavailable(e):
                raise
            log.warning("rollback of edit %s: the record could not be re-read (%s)", edit_id, db.describe(e))
            edit.status, edit.rolled_back_at, edit.rolled_back_by = EditStatus.ROLLED_BACK, utcnow(), actor
            return edit
