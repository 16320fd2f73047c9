"""The served weights of a process: ``editor_core.state.WeightState`` with its deltas read from the edit log,
a summation whose bytes do not depend on the machine, and a batched apply for replays.

Memory does not grow with the number of edits: the deltas of the active edits stay in the log (``LogDeltas``
reads them back when a rollback rebuilds a module), and the process holds per editable module only W^0, the
float32 accumulator and the served weight, plus which modules each active edit touched. What the deltas in
memory used to buy, a rollback without reading the log, is bought back by **checkpoints** (``WeightState``'s,
written under ``<home>/state/weights/``): every ``save_checkpoint`` writes the accumulators and the active ids, and

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

from collections.abc import Callable, Iterable, Iterator
from typing import ContextManager

import torch

from editor_core.delta import LowRankDelta
from editor_core.state import DeltaRejected, WeightState, weights_fingerprint


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


class ServedWeights(WeightState):
    """The service's WeightState: deltas in the log (``store``; the engine passes ``LogDeltas``),
    checkpoints under ``checkpoint_dir`` (WeightState's arguments), machine-independent sums."""

    fingerprint_scheme = FINGERPRINT_SCHEME

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
