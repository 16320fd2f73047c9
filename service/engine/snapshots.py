"""Snapshots: the editors' state (RLSEdit's C) and checkpoints of the served weights, so a start replays
only the edits since the last one. They are a cache: deleting them costs only time."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from sqlalchemy.orm import Session

from .. import crud

log = logging.getLogger("hiedit.engine")
T = TypeVar("T")


class SnapshotsMixin:
    """Part of :class:`service.engine.engine.EditEngine`: editor snapshots and weight checkpoints."""

    def _snapshot_path(self, method: str) -> Path:
        return self.settings.home / "state" / f"{method}.safetensors"

    def _load_editor_snapshots(self, applied: set[int]) -> dict[str, set[int]]:
        """Editors that snapshot their state start from their last snapshot; ``restore`` then skips the
        edits it holds, and edits it holds that the log no longer has applied are forgotten. Returns
        {method: ids of applied edits its snapshot holds}."""
        held_by: dict[str, set[int]] = {}
        for method, editor in self.editors.items():
            path = self._snapshot_path(method)
            if not path.is_file():
                continue
            try:
                held = editor.load_state(path)  # changes nothing when it does not fit this editor
            except Exception as e:  # noqa: BLE001 - a stale or foreign snapshot: replay the recursion instead
                log.warning("%s snapshot %s not used (%s); replaying the whole log", method, path, e)
                continue
            stale = sorted((i for i in held if i not in applied), reverse=True)
            blobs = self._state_blobs(stale)
            try:
                for edit_id in stale:
                    editor.forget(edit_id, blobs.get(edit_id, ("", None))[1])
            except ValueError as e:  # SingularSystemError, RLSStateMismatch
                log.warning("%s snapshot %s not used: it holds edit %s, since rolled back, which the editor "
                            "cannot forget (%s); replaying the whole log", method, path, edit_id, e)
                editor.reset()
                continue
            held_by[method] = set(held) - set(stale)
            log.info("%s state from %s (%d edits in it, %d since rolled back)", method, path, len(held), len(stale))
        return held_by

    def _load_weights_checkpoint(self, applied: list[int], held: dict[str, set[int]]) -> None:
        """Start the served weights from their newest checkpoint that fits the log, then restore into the
        editors the edits it holds that their own snapshots do not (a missing or older editor snapshot)."""
        covered = self.state.load_checkpoint(applied)
        if not covered:
            return
        methods = dict(self._read_batched(lambda s, chunk: crud.edit_methods(s, chunk).items(), covered))
        # only the blobs an editor still needs: those its own snapshot does not hold (none, usually)
        need = [i for i in covered if methods.get(i) in self.editors and i not in held.get(methods[i], ())]
        blobs = self._state_blobs(need)
        for edit_id in need:
            method, blob = blobs.get(edit_id, ("", None))
            if blob is not None:
                self.editors[method].restore(edit_id, blob)
        log.info("served weights from a checkpoint of %d edits (%s)", len(covered), self.state.checkpoints[-1].path)

    def _read_batched(self, read: Callable[[Session, list[int]], Iterable[T]], ids: list[int],
                      batch: int = 500) -> Iterator[T]:
        """``read(session, chunk)`` over ``ids``, ``batch`` ids to a chunk, each chunk in its own short session:
        SQLite bounds the parameters of one ``IN (...)``, and a start or rollback over 10,000 edits must not
        hold one read transaction (or every blob) at once."""
        for i in range(0, len(ids), batch):
            with self.sessions() as session:
                yield from read(session, ids[i:i + batch])

    def _delta_blobs(self, ids: list[int]) -> Iterator[tuple[int, bytes]]:
        """(id, delta blob) of ``ids`` from the log, in id order, 200 rows at a time (LogDeltas' reader)."""
        return self._read_batched(crud.delta_blobs, ids, batch=200)

    def _rebuild_editor_state(self, method: str) -> None:
        """Reset the ``method`` editor and restore, in id order, the logged state of the active edits it made:
        the state a fresh replay of the log builds (when a ``forget`` was refused)."""
        editor = self.editors[method]
        editor.reset()
        active = self.state.active_ids
        methods = dict(self._read_batched(lambda s, chunk: crud.edit_methods(s, chunk).items(), active))
        mine = sorted(i for i in active if methods.get(i) == method)
        for edit_id, (_, blob) in self._read_batched(lambda s, chunk: sorted(crud.state_blobs(s, chunk).items()),
                                                     mine):
            editor.restore(edit_id, blob)
        log.info("%s editor state rebuilt from the log (%d edits)", method, len(mine))

    def _state_blobs(self, ids: list[int]) -> dict[int, tuple[str, bytes | None]]:
        """{id: (method, editor state blob)} of ``ids``."""
        return dict(self._read_batched(lambda s, chunk: crud.state_blobs(s, chunk).items(), ids))

    def _save_editor_snapshots(self) -> None:
        """Snapshot the editors' state while it matches the log (on the writer, between jobs)."""
        self._changes_since_snapshot = 0
        if not self.ready or self._log_uncertain:
            return
        for method, editor in self.editors.items():
            try:
                editor.save_state(self._snapshot_path(method))
            except Exception as e:  # noqa: BLE001 - only a slower next start
                log.warning("%s state not snapshotted: %s", method, e)
        try:
            self.state.save_checkpoint()
        except Exception as e:  # noqa: BLE001 - only a slower next start or rollback
            log.warning("served weights not checkpointed: %s", e)
