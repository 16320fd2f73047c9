"""Training records as teacher-forced token tensors, for the HiEdit trainer (train.py)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .capture import EditInputError, TeacherForced, teacher_forced
from .data import EditRecord
from .tensors import right_pad


class BadRecord(ValueError):
    """A training record that cannot be tokenized for this model; names the record index and field."""


@dataclass
class TrainExample:
    """A training record tokenized for this model."""

    edit: TeacherForced
    rephrase: TeacherForced
    loc: TeacherForced | None


def tokenize_records(tokenizer, records: Sequence[EditRecord], max_prompt_tokens: int, max_target_tokens: int,
                     skip_bad: bool = False) -> tuple[list[TrainExample], int]:
    """Tokenize every record for teacher forcing; (examples, n_skipped).

    A record that cannot be encoded raises BadRecord naming its index, case_id and field,
    unless ``skip_bad``, in which case it is counted and left out.
    """
    out, skipped = [], 0
    for i, r in enumerate(records):
        parts = {"prompt": (r.prompt, r.target_new), "rephrase": (r.rephrase or r.prompt, r.target_new)}
        if r.locality_prompt.strip() or r.locality_target.strip():
            parts["locality_prompt"] = (r.locality_prompt, r.locality_target)
        tf: dict[str, TeacherForced] = {}
        try:
            for name, (prompt, target) in parts.items():
                try:
                    tf[name] = teacher_forced(tokenizer, prompt, target, max_prompt_tokens, max_target_tokens)
                except EditInputError as e:
                    # teacher_forced names "prompt"/"target"; say which record field that was
                    target_field = {"prompt": "target_new", "rephrase": "target_new",
                                    "locality_prompt": "locality_target"}[name]
                    what = str(e)
                    field_name = target_field if what.startswith("target") else name
                    raise BadRecord(f"record {i} (case_id {r.case_id}): field {field_name}: {what}") from e
        except BadRecord:
            if not skip_bad:
                raise
            skipped += 1
            continue
        out.append(TrainExample(tf["prompt"], tf["rephrase"], tf.get("locality_prompt")))
    return out, skipped


def pad_examples(batch: Sequence[TeacherForced], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad teacher-forced examples: (input_ids [B,T], attention_mask [B,T], labels [B,T]).

    Right padding keeps every real token's position and causal context unchanged.
    """
    ids, mask = right_pad([ex.input_ids[0] for ex in batch], pad_id)
    labels, _ = right_pad([ex.labels[0] for ex in batch], -100)
    return ids.to(device), mask.to(device), labels.to(device)
