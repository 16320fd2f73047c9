"""The weight state of DESIGN §3: W_l = W_l^0 + Σ_{active i, in id order} ΔW_l^(i).

For every editable module the state keeps W^0 (in the model's dtype) and a float32
accumulator ``acc``; the served weight is ``cast(W^0 + acc)``. Applying edit i adds its
low-rank product into ``acc`` (``acc.addmm_(left, right)``); rolling it back rebuilds each
module it touched from zero, adding the remaining deltas in id order. Replaying the same
active edits in a fresh process performs the same float operations in the same order, so
the served bytes, and the fingerprint, are bit-identical.

The deltas themselves are kept by a ``DeltaStore``: in memory by default (the trainer and the
evaluation harness), or read back from the edit log (the service: ``service.weights.LogDeltas``),
so that what a served state holds in memory does not grow with the number of edits. The state itself
only remembers which modules each active edit touched, to know what a rollback must rebuild.

**Checkpoints** (``save_checkpoint`` / ``load_checkpoint``, under ``checkpoint_dir``) are the float32
accumulators and the active ids, written with the fingerprint they give: a start loads the newest one
whose ids are the log's and applies only the edits after it (the service; a resumed evaluation), and a
rollback rebuilds from the newest one older than the edit. A checkpoint *is* a replay's accumulator after
its newest id, so the served bytes are those of a replay from W^0. One whose ids no longer match (an edit
in it was rolled back) is deleted; one for another model, module set or summation scheme is ignored.

Every change is computed into new tensors first and swapped in at the end, under the
caller's ``swap_lock``: a failure leaves weights, accumulators and the fingerprint as they were,
and a reader holding that lock never sees a half-applied edit.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .delta import LowRankDelta


log = logging.getLogger("hiedit.weights")

CHECKPOINT_FORMAT = "hiedit-weights-checkpoint-v1"


class DeltaRejected(ValueError):
    """A delta that must not be applied: non-finite, wrong module or shape, or it overflows the dtype."""


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype, bf16 included)."""
    flat = t.detach().contiguous().to("cpu").reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def weights_fingerprint(model_name: str, weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256(model_name.encode())
    for name, w in weights:
        h.update(name.encode())
        h.update(tensor_digest(w).encode())
    return h.hexdigest()


class DeltaStore(Protocol):
    """Where the deltas of the active edits live while they are active."""

    def put(self, edit_id: int, delta: LowRankDelta) -> None:
        """Edit ``edit_id`` became active with ``delta``."""

    def drop(self, edit_id: int) -> None:
        """Edit ``edit_id`` is no longer active."""

    def load(self, ids: list[int]) -> Iterator[tuple[int, LowRankDelta]]:
        """(id, delta) of ``ids`` (active edits, ascending), in that order, on the weights' device."""


class MemoryDeltas:
    """The deltas in a dict: O(active edits) memory, for the trainer and the evaluation harness."""

    def __init__(self) -> None:
        self.deltas: dict[int, LowRankDelta] = {}

    def put(self, edit_id: int, delta: LowRankDelta) -> None:
        self.deltas[edit_id] = delta

    def drop(self, edit_id: int) -> None:
        self.deltas.pop(edit_id, None)

    def load(self, ids: list[int]) -> Iterator[tuple[int, LowRankDelta]]:
        return ((i, self.deltas[i]) for i in ids)


class NoDeltas:
    """Keeps no delta: for a state that is only ever reset, never rolled back (the evaluation harness, whose
    1,000-edit streams would otherwise hold every delta: ``ft``'s are full-rank, up to 78 MB an edit on SmolLM2)."""

    def put(self, edit_id: int, delta: LowRankDelta) -> None:
        pass

    def drop(self, edit_id: int) -> None:
        pass

    def load(self, ids: list[int]) -> Iterator[tuple[int, LowRankDelta]]:
        if ids:
            raise RuntimeError("this weight state keeps no deltas (NoDeltas): it can be reset, not rolled back")
        return iter(())


@dataclass
class Checkpoint:
    """What a checkpoint file says of itself (its metadata; the accumulators stay on disk until used)."""

    path: Path
    ids: list[int]            # the active edits whose sum its accumulators are, ascending
    fingerprint: str          # of the served weights those accumulators give

    @property
    def newest(self) -> int:
        return self.ids[-1]


class WeightState:
    """Owns the editable weights of a model: base copies, accumulators, which edits are active.

    Args:
        modules: {dotted name: nn.Linear} for every module any editor may change.
        model_name: mixed into the fingerprint so different bases never collide.
        store: keeps the active edits' deltas (default: in memory).
        checkpoint_dir: where ``save_checkpoint`` writes and ``load_checkpoint`` finds checkpoints of the
            accumulators (None: no checkpoints).
        keep_checkpoints: how many of the newest checkpoints are kept (each is the size of the float32
            accumulators of every module an edit touched: 57 MB for SmolLM2's default editor).
    """

    fingerprint_scheme = "addmm-v1"  # how ``_accumulate`` sums; a checkpoint is read only by the same scheme

    def __init__(self, modules: dict[str, nn.Linear], model_name: str, store: DeltaStore | None = None,
                 checkpoint_dir: Path | None = None, keep_checkpoints: int = 3):
        self.modules = dict(modules)
        self.model_name = model_name
        self.base = {n: m.weight.detach().clone() for n, m in self.modules.items()}
        self.acc: dict[str, torch.Tensor] = {}  # allocated on first touch: float32, same shape as W^0
        self.store: DeltaStore = store if store is not None else MemoryDeltas()
        self.touched: dict[int, tuple[str, ...]] = {}  # active edit id -> the modules its delta changes
        self._digests = {n: tensor_digest(w) for n, w in self.base.items()}
        self._dirty: set[str] = set()  # modules swapped since their digest was taken
        self.base_fingerprint = self.fingerprint()
        self.checkpoint_dir = checkpoint_dir
        self.keep_checkpoints = keep_checkpoints
        self.checkpoints: list[Checkpoint] = []  # valid for the active edits, oldest first

    # ---- queries --------------------------------------------------------------------------

    @property
    def active_ids(self) -> list[int]:
        return sorted(self.touched)

    def fingerprint(self) -> str:
        """sha256 over the model name and the served bytes of every editable module."""
        for name in list(self._dirty):  # hashed lazily: hashing is off the edit path
            self._digests[name] = tensor_digest(self.modules[name].weight)
            self._dirty.discard(name)
        h = hashlib.sha256(self.model_name.encode())
        for name in self.modules:
            h.update(name.encode())
            h.update(self._digests[name].encode())
        return h.hexdigest()

    # ---- changes ----------------------------------------------------------------------------

    def validate(self, delta: LowRankDelta) -> None:
        """Raise DeltaRejected unless ``delta`` can be applied to this state."""
        for name, (left, right) in delta.factors.items():
            if name not in self.modules:
                raise DeltaRejected(f"delta touches {name}, which is not an editable module of this model")
            d_out, d_in = self.base[name].shape
            if left.shape[0] != d_out or right.shape[1] != d_in:
                raise DeltaRejected(f"delta for {name} has shape {left.shape[0]}x{right.shape[1]}, "
                                    f"the weight is {d_out}x{d_in}")
        if not delta.is_finite():
            raise DeltaRejected("delta contains NaN or inf values")

    def apply(self, edit_id: int, delta: LowRankDelta, swap_lock: ContextManager | None = None) -> None:
        """Add edit ``edit_id``. Ids must grow; anything else is a replay error."""
        if edit_id in self.touched:
            raise ValueError(f"edit {edit_id} is already applied")
        if self.touched and edit_id < max(self.touched):
            raise ValueError(f"edit {edit_id} is older than the newest active edit {max(self.touched)}: "
                             "apply edits in id order")
        self._swap(self._added(delta), swap_lock)
        self._activate(edit_id, delta)

    @contextlib.contextmanager
    def trial(self, delta: LowRankDelta) -> Iterator[None]:
        """Serve ``delta`` on top of the active edits for the block, then put back exactly what was served.

        What a rollback would rebuild from W^0 and every remaining delta (O(active edits)) is restored
        here from the tensors the block replaced: the served bytes, accumulators and digests are the
        ones of before. Not an edit: ``active_ids`` never lists it. The caller holds whatever lock keeps
        readers from seeing the trial (the engine: the write side of its RWLock, for the whole block).
        """
        saved = {n: (self.modules[n].weight.data, self.acc.get(n), self._digests[n], n in self._dirty)
                 for n in delta.modules if n in self.modules}
        self._swap(self._added(delta), None)  # validates first: nothing is swapped when it raises
        try:
            yield
        finally:
            for name, (weight, acc, digest, dirty) in saved.items():
                self.modules[name].weight.data = weight
                if acc is None:
                    self.acc.pop(name, None)
                else:
                    self.acc[name] = acc
                self._digests[name] = digest
                if dirty:  # its saved digest predates the weight: a fingerprint() inside the block cleared it
                    self._dirty.add(name)
                else:
                    self._dirty.discard(name)

    def rollback(self, edit_id: int, swap_lock: ContextManager | None = None) -> None:
        """Remove edit ``edit_id``, rebuilding the modules it touched from W^0 and the rest."""
        if edit_id not in self.touched:
            raise KeyError(f"edit {edit_id} is not active")
        names = self.touched[edit_id]
        start, after = self._rollback_start(edit_id, names)
        new_acc = self._rebuild(names, self.store.load(self._touching(names, exclude=edit_id, after=after)), start)
        self._swap(new_acc, swap_lock)
        self._deactivate(edit_id)
        self._drop_checkpoints_from(edit_id)

    def served_with(self, deltas: Iterable[tuple[int, LowRankDelta]]) -> dict[str, torch.Tensor]:
        """The served weight of every editable module if exactly ``deltas`` ((id, delta), ascending ids)
        were the active edits.

        The same float operations a replay of them performs (from W^0, in id order), so with the active
        edits it is the served bytes; nothing here changes. ``deltas`` is consumed one at a time (a log of
        any length fits). For exports: {name: [d_out, d_in] tensor}.
        """
        def checked() -> Iterator[tuple[int, LowRankDelta]]:
            last = None
            for edit_id, delta in deltas:
                if last is not None and edit_id <= last:
                    raise ValueError(f"served_with: edit {edit_id} after edit {last}: give the edits in id order")
                self.validate(delta)
                last = edit_id
                yield edit_id, delta
        return {name: self._served(name, acc) for name, acc in self._rebuild(self.modules, checked()).items()}

    def reset(self, swap_lock: ContextManager | None = None) -> None:
        """Drop every edit: the served weights become W^0 again, byte for byte."""
        self._swap({n: None for n in self.acc}, swap_lock)
        for edit_id in list(self.touched):
            self._deactivate(edit_id)
        self.checkpoints = []

    # ---- checkpoints ----------------------------------------------------------------------------

    def _signature(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "model": self.model_name, "scheme": self.fingerprint_scheme,
                "base_fingerprint": self.base_fingerprint, "modules": json.dumps(list(self.modules))}

    def save_checkpoint(self) -> Checkpoint | None:
        """Write the accumulators of the current active edits (none when there are no edits, no directory,
        or the newest checkpoint already holds them); prune to the newest ``keep_checkpoints``."""
        ids = self.active_ids
        if self.checkpoint_dir is None or not ids or (self.checkpoints and self.checkpoints[-1].ids == ids):
            return None
        names = list(self.modules)
        tensors = {f"acc.{names.index(n)}": a.detach().cpu().contiguous() for n, a in self.acc.items()}
        touched = {str(i): [names.index(n) for n in self.touched[i]] for i in ids}
        fingerprint = self.fingerprint()
        meta = {**self._signature(), "ids": json.dumps(ids), "touched": json.dumps(touched),
                "fingerprint": fingerprint}
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"upto-{ids[-1]:010d}-n{len(ids)}.safetensors"
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
        self.checkpoints = [c for c in self.checkpoints if c.path != path] + [Checkpoint(path, ids, fingerprint)]
        for old in self.checkpoints[:-self.keep_checkpoints]:
            old.path.unlink(missing_ok=True)
        self.checkpoints = self.checkpoints[-self.keep_checkpoints:]
        return self.checkpoints[-1]

    def _read_meta(self, path: Path) -> tuple[dict, Checkpoint] | None:
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if any(meta.get(k) != v for k, v in self._signature().items()):
                return None
            return meta, Checkpoint(path, json.loads(meta["ids"]), meta["fingerprint"])
        except Exception as e:  # noqa: BLE001 - a torn or foreign file is only a slower start
            log.warning("weights checkpoint %s not used: %s", path, e)
            return None

    def _read_accumulators(self, cp: Checkpoint, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """{module: accumulator on its weight's device} stored in ``cp`` (of ``names``, default all)."""
        index = {n: i for i, n in enumerate(self.modules)}
        with safe_open(str(cp.path), "pt", device="cpu") as f:
            stored = set(f.keys())
            return {n: f.get_tensor(f"acc.{index[n]}").to(self.base[n].device)
                    for n in (self.modules if names is None else names) if f"acc.{index[n]}" in stored}

    def load_checkpoint(self, wanted: list[int]) -> list[int]:
        """Start from the newest checkpoint whose ids are ``wanted``'s (the log's applied ids, ascending) up
        to its newest; the ids it holds ([] when none fits). Only on a state with no active edit.

        The loaded weights are checked against the fingerprint the checkpoint was written with; a checkpoint
        that fails it is ignored (and the state left as it was). The store is not read: with the in-memory
        store (a resumed evaluation) the edits the checkpoint holds cannot be rolled back one by one, only
        ``reset``; the service's store is the log, which has them."""
        if self.touched:
            raise ValueError("load_checkpoint: only before any edit is applied")
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return []
        found: list[tuple[dict, Checkpoint]] = []
        for path in sorted(self.checkpoint_dir.glob("upto-*.safetensors")):
            read = self._read_meta(path)
            if read is None:
                continue
            meta, cp = read
            if cp.ids and cp.ids == [i for i in wanted if i <= cp.newest]:
                found.append(read)
            else:
                path.unlink(missing_ok=True)  # an edit in it was rolled back since, or it holds foreign ids
        for meta, cp in reversed(found):
            names = list(self.modules)
            try:
                acc = self._read_accumulators(cp)
                touched = {int(i): tuple(names[j] for j in js) for i, js in json.loads(meta["touched"]).items()}
            except Exception as e:  # noqa: BLE001
                log.warning("weights checkpoint %s not used: %s", cp.path, e)
                continue
            self._swap(acc, None)
            if self.fingerprint() != cp.fingerprint:
                log.warning("weights checkpoint %s not used: its weights do not give its fingerprint", cp.path)
                self.reset()
                continue
            self.touched = touched
            self.checkpoints = [c for _, c in found if c.newest <= cp.newest]
            return cp.ids
        return []

    def _rollback_start(self, edit_id: int, names: tuple[str, ...]) -> tuple[dict[str, torch.Tensor] | None, int | None]:
        """The newest checkpoint older than ``edit_id``: its accumulators of ``names`` and its newest id, so a
        rollback reads only the deltas after it from the log (W^0 when there is none)."""
        for cp in reversed(self.checkpoints):
            if cp.newest >= edit_id:
                continue
            try:
                return self._read_accumulators(cp, names), cp.newest
            except Exception as e:  # noqa: BLE001 - a vanished checkpoint: an older one, or W^0
                log.warning("weights checkpoint %s not used: %s", cp.path, e)
        return None, None

    def _drop_checkpoints_from(self, edit_id: int) -> None:
        """After edit ``edit_id`` left the active set: the checkpoints that hold it are deleted."""
        for cp in [c for c in self.checkpoints if c.newest >= edit_id]:  # they hold the edit just removed
            cp.path.unlink(missing_ok=True)
        self.checkpoints = [c for c in self.checkpoints if c.newest < edit_id]

    # ---- internals ----------------------------------------------------------------------------

    def _added(self, delta: LowRankDelta) -> dict[str, torch.Tensor]:
        """New accumulators of the modules ``delta`` touches: acc + left @ right (validated first)."""
        self.validate(delta)
        new_acc = {}
        for name, (left, right) in delta.factors.items():
            acc = self.acc.get(name)
            acc = torch.zeros(self.base[name].shape, dtype=torch.float32, device=self.base[name].device) \
                if acc is None else acc.clone()
            self._accumulate(acc, left, right)
            new_acc[name] = acc
        return new_acc

    def _accumulate(self, acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        """acc += left @ right, in place: every change of ``acc`` goes through here, so a subclass that
        changes how the product is summed (service.weights.ServedWeights) changes it everywhere at once."""
        acc.addmm_(left.to(acc.device, torch.float32), right.to(acc.device, torch.float32))

    def _activate(self, edit_id: int, delta: LowRankDelta) -> None:
        self.store.put(edit_id, delta)
        self.touched[edit_id] = tuple(delta.modules)

    def _deactivate(self, edit_id: int) -> None:
        self.store.drop(edit_id)
        del self.touched[edit_id]

    def _touching(self, names: Iterable[str], exclude: int | None = None, after: int | None = None) -> list[int]:
        """Active ids (ascending) whose deltas change any of ``names``, without ``exclude``, above ``after``."""
        names = set(names)
        return [i for i in sorted(self.touched)
                if i != exclude and (after is None or i > after) and not names.isdisjoint(self.touched[i])]

    def _rebuild(self, names: Iterable[str], deltas: Iterable[tuple[int, LowRankDelta]],
                 start: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor | None]:
        """Accumulators of ``names`` from ``start`` (default: zero) plus ``deltas`` in the order given.

        Each module receives its deltas in id order whatever the loop nesting, so this is the float
        sequence of a replay; ``deltas`` is read once, one delta at a time."""
        out: dict[str, torch.Tensor | None] = {n: (start[n].clone() if start and start.get(n) is not None else None)
                                               for n in names}
        for _, delta in deltas:
            for name, (left, right) in delta.factors.items():
                if name not in out:
                    continue
                acc = out[name]
                if acc is None:
                    acc = out[name] = torch.zeros(self.base[name].shape, dtype=torch.float32,
                                                  device=self.base[name].device)
                self._accumulate(acc, left, right)
        return out

    def _served(self, name: str, acc: torch.Tensor | None) -> torch.Tensor:
        """cast(W^0 + acc) in the model's dtype; W^0 itself when no edit touches the module."""
        w0 = self.base[name]
        if acc is None:
            return w0
        w = (w0.float() + acc).to(w0.dtype)
        if not bool(torch.isfinite(w).all()):
            raise DeltaRejected(f"the edited weight of {name} overflows {w0.dtype}")
        return w

    def _swap(self, new_acc: dict[str, torch.Tensor | None], swap_lock: ContextManager | None) -> None:
        """Compute served weights for ``new_acc`` (None = no edits left), then swap them in."""
        served = {name: self._served(name, acc) for name, acc in new_acc.items()}
        with swap_lock or contextlib.nullcontext():
            for name, w in served.items():
                # A pointer swap: readers see the old or the new tensor, never a mix.
                self.modules[name].weight.data = w if w is not self.base[name] else w.clone()
                if new_acc[name] is None:
                    self.acc.pop(name, None)
                else:
                    self.acc[name] = new_acc[name]
            self._dirty.update(served)
