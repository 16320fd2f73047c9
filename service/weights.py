"""The served weights of a process: ``editor_core.state.WeightState`` with its deltas read from the edit log,
accumulator checkpoints on disk, and a batched apply for replays.

Memory does not grow with the number of edits: the deltas of the active edits stay in the log (``LogDeltas``
reads them back when a rollback rebuilds a module), and the process holds per editable module only W^0, the
float32 accumulator and the served weight, plus which modules each active edit touched. What the deltas in
memory used to buy, a rollback without reading the log, is bought back by **checkpoints**: every
``save_checkpoint`` writes the accumulators and the active ids (``<home>/state/weights/``), and

- a start loads the newest checkpoint whose active ids are the log's (up to its newest id) and replays only the
  edits after it (``load_checkpoint``), instead of every edit since W^0;
- a rollback of edit i rebuilds the modules i touched from the newest checkpoint older than i, adding only the
  active deltas after it, instead of every active delta since W^0.

Both perform the float operations of a replay from W^0 (a checkpoint *is* that replay's accumulator after its
newest id; the deltas after it are added in id order), so the served bytes and the fingerprint are the same as
without checkpoints. A checkpoint that no longer matches the active edits (an edit in it was rolled back) is
deleted; one that does not match this server (model, modules, summation scheme, or its own fingerprint) is
ignored. They are a cache: deleting them costs only time. A start from a checkpoint does not re-read the
deltas it holds, so a log row corrupted after it was checkpointed is found by a start without checkpoints (a
replica with a fresh home, which replays and validates every row), not by this one.

A start with 1,000 edits in the log applied them one ``WeightState.apply`` at a time, and every one
recomputed, checked and swapped the full served weight of each module it touched: 19 s of a 2-core
machine's start for the demo model (docs/benchmarks.md). ``apply_many`` performs exactly the same
float operations on the accumulators in the same order (so the served bytes, and the fingerprint,
are identical: DESIGN §3), but computes, checks and swaps each module's served weight once. The
service has one way to apply edits: ``ServedWeights.apply`` is ``apply_many`` of one edit (the same
checks, float operations and swap as ``WeightState.apply``, whose exceptions it raises).

This belongs in ``WeightState`` itself (editor_core); it lives here until it moves there, and
``tests/test_reliability.py`` checks it against ``WeightState.apply`` one by one, refusals included.

The served weights are also summed so that their bytes do not depend on the thread count, the BLAS or
the device (``ServedWeights._accumulate``): a replica verifies every state it reaches against the
fingerprint the writer recorded for it (service.replica), and ``addmm``'s GEMM is free to split and
order its sums differently from one thread count or CPU to the next.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editor_core.delta import LowRankDelta
from editor_core.state import DeltaRejected, WeightState, weights_fingerprint

log = logging.getLogger("hiedit.weights")

CHECKPOINT_FORMAT = "hiedit-weights-checkpoint-v1"


def base_model_fingerprint(model: torch.nn.Module, model_name: str) -> str:
    """Identity of the base model the edits of a log apply to (``edits.base_fingerprint``).

    sha256 over the model name and *every* parameter, rounded to bf16 as HiEdit's checkpoint check
    does (``editor_core.hiedit.base_weights_fingerprint``). Not ``WeightState.base_fingerprint`` (GET
    /state's ``base_fingerprint``): that one covers only the editable modules in the served dtype, so
    it changes with the editor settings (--editor, --rlsedit, --rlsedit-layers) and --dtype, and a
    restart with other settings on the same base model would look like another base model. Those
    cases keep their own handling (``LogSettingsMismatch`` names the settings a log needs). Call it
    before any edit is applied: it hashes the weights as they are.
    """
    return weights_fingerprint(model_name, ((n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters()))


# Identifies how the served weights are summed; recorded with every edit (edits.fingerprint_scheme), so a
# replica compares its fingerprints only with those the writer computed the same way.
FINGERPRINT_SCHEME = "rank1-v1"


class LogDeltas:
    """The active edits' deltas, read back from the edit log when a rollback needs them (nothing kept).

    Args:
        read: ids (ascending) -> (id, delta blob) of those edits, in id order, a batch at a time.
        device: where the deltas are moved.
    """

    def __init__(self, read: Callable[[list[int]], Iterable[tuple[int, bytes]]], device: torch.device | str):
        self.read = read
        self.device = device

    def put(self, edit_id: int, delta: LowRankDelta) -> None:
        pass  # already in the log: an edit is applied only after it is logged

    def drop(self, edit_id: int) -> None:
        pass

    def load(self, ids: list[int]) -> Iterator[tuple[int, LowRankDelta]]:
        want = iter(ids)
        for edit_id, blob in self.read(ids):
            expected = next(want, None)
            if edit_id != expected:  # a row the log lost would silently change the rebuilt weights
                raise DeltaRejected(f"the log has no delta for active edit {expected} (read {edit_id})")
            yield edit_id, LowRankDelta.from_bytes(blob).to(self.device)
        missing = next(want, None)
        if missing is not None:
            raise DeltaRejected(f"the log has no delta for active edit {missing}")


@dataclass
class Checkpoint:
    """What a checkpoint file says of itself (its metadata; the accumulators stay on disk until used)."""

    path: Path
    ids: list[int]            # the active edits whose sum its accumulators are, ascending
    fingerprint: str          # of the served weights those accumulators give

    @property
    def newest(self) -> int:
        return self.ids[-1]


class ServedWeights(WeightState):
    """The service's WeightState: deltas in the log (``store``), checkpoints under ``checkpoint_dir``.

    Args:
        modules, model_name: as WeightState.
        store: where the active deltas are read back from (the engine passes ``LogDeltas``).
        checkpoint_dir: where checkpoints are written and found (None: no checkpoints).
        keep_checkpoints: how many of the newest checkpoints are kept (each is the size of the float32
            accumulators of every module an edit touched: 57 MB for SmolLM2's default editor).
    """

    fingerprint_scheme = FINGERPRINT_SCHEME

    def __init__(self, modules, model_name: str, store=None, checkpoint_dir: Path | None = None,
                 keep_checkpoints: int = 3):
        super().__init__(modules, model_name, store)
        self.checkpoint_dir = checkpoint_dir
        self.keep_checkpoints = keep_checkpoints
        self.checkpoints: list[Checkpoint] = []  # valid for the active edits, oldest first

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
        that fails it is ignored (and the state left as it was)."""
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

    def rollback(self, edit_id: int, swap_lock: ContextManager | None = None) -> None:
        super().rollback(edit_id, swap_lock)
        for cp in [c for c in self.checkpoints if c.newest >= edit_id]:  # they hold the edit just removed
            cp.path.unlink(missing_ok=True)
        self.checkpoints = [c for c in self.checkpoints if c.newest < edit_id]

    def reset(self, swap_lock: ContextManager | None = None) -> None:
        super().reset(swap_lock)
        self.checkpoints = []

    def _accumulate(self, acc: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        """acc += left @ right as a sum of rank-1 outer products, one ``mul`` and one ``add_`` each.

        Both are elementwise: every output element is one correctly rounded IEEE multiplication and one
        addition, in rank order, whatever the threads, the vector width or the device, so the served bytes
        are the same on any machine that sums the same deltas in the same order. Not ``addmm``: a GEMM may
        split its reduction, or use FMA in some kernels and not in others, depending on how the threads cut
        the matrix. Not ``addcmul``: a compiler may fuse its multiply and add into an FMA in the vectorised
        loop and not in the scalar tail, whose position depends on the thread split. The cost: about 2 ms
        instead of 0.25 ms per rank-10 delta of a 1536x576 module (one thread), paid per applied edit.
        """
        left = left.to(acc.device, torch.float32)
        right = right.to(acc.device, torch.float32)
        outer = torch.empty_like(acc)
        for r in range(left.shape[1]):
            torch.mul(left[:, r:r + 1], right[r:r + 1, :], out=outer)
            acc.add_(outer)

    def apply(self, edit_id: int, delta: LowRankDelta, swap_lock: ContextManager | None = None) -> None:
        """Add edit ``edit_id`` (``WeightState.apply``) by the path of ``apply_many``: ValueError for an id that
        is applied already or out of order, DeltaRejected for a delta the served weights refuse."""
        refused = self._apply_in_order([(edit_id, delta)], swap_lock)
        if refused:
            raise refused[edit_id]

    def apply_many(self, items: list[tuple[int, LowRankDelta]],
                   swap_lock: ContextManager | None = None) -> dict[int, str]:
        """Apply ``items`` ([(edit_id, delta)], ascending ids) as if by ``apply`` one by one, in one swap.

        Returns {edit_id: reason} of the edits ``apply`` would have refused (a delta for another model,
        a non-finite one, an id out of order); they are left out, the others are applied. When the sum
        overflows the served dtype nothing is swapped and the items are applied one by one instead, so
        exactly the edits ``apply`` refuses are refused.
        """
        return {edit_id: str(e) for edit_id, e in self._apply_in_order(items, swap_lock).items()}

    def _apply_in_order(self, items: list[tuple[int, LowRankDelta]],
                        swap_lock: ContextManager | None) -> dict[int, Exception]:
        """``apply_many`` with the exception of each refused edit (what ``apply`` raises)."""
        refused: dict[int, Exception] = {}
        accepted: list[tuple[int, LowRankDelta]] = []
        newest = max(self.touched, default=None)
        for edit_id, delta in items:
            if edit_id in self.touched or edit_id == newest:
                refused[edit_id] = ValueError(f"edit {edit_id} is already applied")
                continue
            if newest is not None and edit_id < newest:
                refused[edit_id] = ValueError(f"edit {edit_id} is older than the newest active edit {newest}: "
                                              "apply edits in id order")
                continue
            try:
                self.validate(delta)
            except DeltaRejected as e:
                refused[edit_id] = e
                continue
            accepted.append((edit_id, delta))
            newest = edit_id
        new_acc: dict[str, torch.Tensor] = {}
        for _, delta in accepted:  # per edit what WeightState.apply adds, without the per-edit swap
            for name, (left, right) in delta.factors.items():
                acc = new_acc.get(name)
                if acc is None:
                    acc = self.acc.get(name)
                    acc = torch.zeros(self.base[name].shape, dtype=torch.float32, device=self.base[name].device) \
                        if acc is None else acc.clone()
                    new_acc[name] = acc
                self._accumulate(acc, left, right)
        try:
            self._swap(new_acc, swap_lock)  # raises before swapping anything when a weight overflows
        except DeltaRejected as e:
            if len(accepted) == 1:
                refused[accepted[0][0]] = e
                return refused
            for edit_id, delta in accepted:  # find which edits overflow, one by one
                refused.update(self._apply_in_order([(edit_id, delta)], swap_lock))
            return refused
        for edit_id, delta in accepted:
            self._activate(edit_id, delta)
        return refused
