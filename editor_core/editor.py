"""The small interface between editors and whoever owns the weights.

An editor looks at the model as it is now and proposes a low-rank delta for one fact;
it never changes weights itself. The engine (service) or the evaluation harness validates
the proposal, logs it and applies it through ``WeightState``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from .delta import LowRankDelta


@dataclass
class LocalityPrompt:
    prompt: str
    target: str


@dataclass
class EditRequest:
    """One fact to write: ``prompt`` should continue with ``target``."""

    prompt: str
    target: str
    rephrases: list[str] = field(default_factory=list)
    locality: list[LocalityPrompt] = field(default_factory=list)
    subject: str | None = None


@dataclass
class Proposal:
    """What an editor wants to change, and why.

    modules:      every editable module of the editor, in module-index order
    importances:  [L] router scores (HiEdit) or per-module weights (others), float32 CPU
    selected:     indices into ``modules`` that the delta touches
    delta:        the low-rank change of the selected modules
    loss_before:  teacher-forced target loss at the current weights
    n_tokens:     tokens whose (u, δ) the proposal was built from
    info:         method-specific notes recorded with the edit (e.g. a derived subject)
    """

    modules: list[str]
    importances: torch.Tensor
    selected: list[int]
    delta: LowRankDelta
    loss_before: float
    n_tokens: int
    info: dict = field(default_factory=dict)
    state_blob: bytes | None = None  # editor state to log with the edit (RLSEdit: its keys), see Editor.restore

    @property
    def selected_modules(self) -> list[str]:
        return [self.modules[i] for i in self.selected]


class Editor(Protocol):
    """What the engine and the evaluation harness call.

    ``propose`` must not change the model or the editor. Stateful editors (RLSEdit's C
    matrices) change their state only in ``commit`` (called after the delta was logged
    and applied), ``forget`` (after an edit was rolled back), ``restore`` (replaying the
    log at start-up, with the ``state_blob`` the proposal carried) and ``reset``. Stateless
    editors (HiEdit) implement them as no-ops.
    """

    method: str
    modules: list[str]  # every module the editor may change, in module-index order

    def propose(self, request: EditRequest, k: int | None = None) -> Proposal: ...

    def commit(self, edit_id: int, proposal: Proposal) -> None: ...

    def forget(self, edit_id: int, state_blob: bytes | None) -> None:
        """Undo ``commit``/``restore`` of a rolled-back edit; ``state_blob`` is the one its proposal carried
        (read back from the log: an editor keeps no per-edit data, so its memory does not grow with edits).
        ``prepare_forget(edit_id, state_blob)()``."""

    def prepare_forget(self, edit_id: int, state_blob: bytes | None) -> Callable[[], None]:
        """Compute and check ``forget``, changing nothing: raises what ``forget`` would raise (ValueError),
        else returns the call that applies it, valid until the editor's state next changes. A rollback asks
        before it changes the weights or the log, and applies the result after."""

    def restore(self, edit_id: int, state_blob: bytes | None) -> None: ...

    def reset(self) -> None:
        """Back to the state of an editor that has committed nothing (the repair when a ``forget`` of an edit
        the log no longer has is refused: the engine then restores the edits still applied)."""

    def save_state(self, path: Path) -> None:
        """Snapshot the editor's state to ``path`` (stateless editors write nothing)."""

    def load_state(self, path: Path) -> list[int]:
        """Replace the state by the snapshot at ``path``; the ids of the edits it holds (raises, changing
        nothing, when the snapshot does not fit this editor)."""


class StatelessEditor:
    """Base for editors whose proposals depend only on their weights and the model (HiEdit and
    the baselines): the state hooks of the Editor protocol are no-ops."""

    def commit(self, edit_id: int, proposal: Proposal) -> None:
        pass

    def forget(self, edit_id: int, state_blob: bytes | None) -> None:
        pass

    def prepare_forget(self, edit_id: int, state_blob: bytes | None) -> Callable[[], None]:
        return lambda: None

    def restore(self, edit_id: int, state_blob: bytes | None) -> None:
        pass

    def reset(self) -> None:
        pass

    def save_state(self, path: Path) -> None:
        pass

    def load_state(self, path: Path) -> list[int]:
        return []
