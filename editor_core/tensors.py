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
