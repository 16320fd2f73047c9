"""Small tensor helpers shared by the editors, the trainer and the benchmark."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def right_pad(rows: Sequence[Sequence[int] | Sequence[float] | torch.Tensor], value: int | float,
              dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one batch, padded on the right.

    rows: B sequences (lists or 1-D tensors) -> (padded [B, T] in ``dtype``, ``value`` after each row's end;
    mask [B, T] long, 1 on a row's own entries), T = the longest row. Right padding keeps every real
    token's position, so under causal attention its logits are the ones it has alone.
    """
    width = max(len(r) for r in rows)
    padded = torch.full((len(rows), width), value, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = torch.as_tensor(r, dtype=dtype)
        mask[i, :len(r)] = 1
    return padded, mask


_MASK_FORM: dict[type, bool] = {}  # model class -> takes logits_to_keep as a [B, T] mask (probed on first use)


def logits_at(model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor,
              keep: torch.Tensor) -> torch.Tensor:
    """Float32 logits [P, V] at the ``keep`` [B, T] (bool) positions, P = keep.sum(), in row-major order.

    The vocabulary projection is the largest matmul of a small model (on SmolLM2 a fifth of the forward
    pass, and as much again in a backward through it), and most positions of an editing batch are prompt
    tokens nobody reads: transformers' ``logits_to_keep`` with a boolean mask projects only the kept
    positions, soft-capped as the model does itself. A model class that does not take that form (probed
    once, so it costs one wasted forward, not one per call) gets the full logits, indexed; once a class
    has taken it, an error in that path is raised, not hidden behind a second forward.
    On the model's device; differentiable when the forward is.
    """
    device = next(model.parameters()).device
    ids, att, mask = input_ids.to(device), attention.to(device), keep.to(device)
    takes_mask = _MASK_FORM.get(type(model))
    if takes_mask is not False:
        try:
            out = model(input_ids=ids, attention_mask=att, logits_to_keep=mask, use_cache=False).logits
            out = out.reshape(-1, out.shape[-1])
            if out.shape[0] == int(mask.sum()):
                _MASK_FORM[type(model)] = True
                return out.float()
        except (TypeError, ValueError, IndexError, RuntimeError):
            if takes_mask:
                raise
        _MASK_FORM[type(model)] = False
    return model(input_ids=ids, attention_mask=att, use_cache=False).logits[mask].float()
