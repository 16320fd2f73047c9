"""Single-edit efficacy: each fact edited alone into the base model, then its prompt and rephrase checked
by greedy decoding (``hiedit train --eval-data``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .capture import EditInputError, TeacherForced, teacher_forced
from .data import EditRecord
from .editor import EditRequest
from .evaluate import all_top1, top1_accuracy
from .hiedit import HiEditor
from .state import WeightState


@torch.no_grad()
def _greedy_match(model, ex: TeacherForced) -> tuple[bool, float]:
    """(greedy decoding of the prompt reproduces the whole target, teacher-forced top-1 token accuracy).

    Both from one teacher-forced pass: greedy decoding yields the target iff the argmax at every target
    position is the target's token (``all_top1``).
    """
    device = next(model.parameters()).device
    labels = ex.labels.to(device)
    logits = model(input_ids=ex.input_ids.to(device)).logits
    return bool(all_top1(logits, labels)[0]), float(top1_accuracy(logits, labels)[0])


def single_edit_efficacy(editor: HiEditor, records: Sequence[EditRecord], k: int | None = None,
                         progress: bool = False) -> dict[str, float]:
    """Edit each record alone into the base model and check its prompt; weights are restored after each.

    Returns percentages: ``greedy`` (greedy decoding yields the new target after the edit),
    ``greedy_before`` (it already did before), ``token_acc`` (teacher-forced top-1 accuracy after)
    and ``rephrase_greedy`` (the same greedy check on the rephrase).
    """
    state = WeightState(editor.module_map, "eval")
    tok = editor.tokenizer
    counts = {"greedy": 0.0, "greedy_before": 0.0, "token_acc": 0.0, "rephrase_greedy": 0.0}
    n = 0
    items = records
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(records, desc="single-edit efficacy", unit="edit")
    try:
        for r in items:
            try:
                ex = teacher_forced(tok, r.prompt, r.target_new)
                rp = teacher_forced(tok, r.rephrase or r.prompt, r.target_new)
            except EditInputError:
                continue
            before, _ = _greedy_match(editor.model, ex)
            proposal = editor.propose(EditRequest(r.prompt, r.target_new), k=k)
            state.apply(0, proposal.delta.to(next(editor.model.parameters()).device))
            after, acc = _greedy_match(editor.model, ex)
            reph, _ = _greedy_match(editor.model, rp)
            state.rollback(0)
            counts["greedy"] += after
            counts["greedy_before"] += before
            counts["token_acc"] += acc
            counts["rephrase_greedy"] += reph
            n += 1
    finally:
        state.reset()
    return {key: 100.0 * v / max(n, 1) for key, v in counts.items()} | {"n": n}
