"""Low-rank weight deltas: the unit every editor produces and every log stores.

A delta holds, per edited module, two float32 factors in ``nn.Linear`` layout::

    ΔW (d_out × d_in) = left (d_out × r) @ right (r × d_in)

HiEdit's ``ΔW_l = -η_l Σ_t ũ_t δ̃_tᵀ`` (paper layout d_in × d_out) becomes
``left = -η_l Δ̃ᵀ`` and ``right = Ũ``; RLSEdit's ``G E`` becomes ``left = Eᵀ``, ``right = Gᵀ``.
The dense product is never formed here: norms and ranks come from r × r Gram matrices.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def frobenius_sq(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """‖left @ right‖_F² = tr((leftᵀ left)(right rightᵀ)), differentiable, without the dense product."""
    return ((left.T @ left) * (right @ right.T)).sum()


@dataclass
class LowRankDelta:
    """{module name: (left [d_out, r], right [r, d_in])}, float32, on CPU or the model's device."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (left, right) in self.factors.items():
            if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
                raise ValueError(f"delta for {name}: factors {tuple(left.shape)} and {tuple(right.shape)} do not chain")

    @property
    def modules(self) -> list[str]:
        return list(self.factors)

    def rank_bound(self, name: str) -> int:
        """Inner dimension r of the factors: an upper bound on rank(ΔW)."""
        return self.factors[name][0].shape[1]

    def rank(self, name: str, rtol: float = 1e-6) -> int:
        """Numerical rank of ΔW = L R, without forming it.

        With L = Q_L R_L and Rᵀ = Q_R R_R (reduced QR), L R = Q_L (R_L R_Rᵀ) Q_Rᵀ has the singular
        values of the small matrix R_L R_Rᵀ. (The eigenvalues of (LᵀL)(RRᵀ) give the same figure,
        but LAPACK's non-symmetric eigensolver failed to converge on one of 1,000 demo edits.)
        """
        left, right = (t.detach().double().cpu() for t in self.factors[name])
        if left.numel() == 0 or right.numel() == 0:
            return 0
        sv = torch.linalg.svdvals(torch.linalg.qr(left).R @ torch.linalg.qr(right.T).R.T)
        top = float(sv.max()) if sv.numel() else 0.0
        return int((sv > rtol * top).sum()) if top > 0 else 0

    def frobenius_norm(self, name: str) -> float:
        """‖L R‖_F = sqrt(tr((LᵀL)(RRᵀ))), without forming L R."""
        left, right = (t.double() for t in self.factors[name])
        return float(torch.trace((left.T @ left) @ (right @ right.T)).clamp_min(0).sqrt())

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(l).all() and torch.isfinite(r).all()) for l, r in self.factors.values())

    def nbytes(self) -> int:
        return sum(l.numel() * l.element_size() + r.numel() * r.element_size() for l, r in self.factors.values())

    def plus(self, other: "LowRankDelta") -> "LowRankDelta":
        """self + other as one delta: per module [L_a | L_b] [R_a ; R_b] (the ranks add)."""
        out = dict(self.factors)
        for name, (left, right) in other.factors.items():
            if name in out:
                la, ra = out[name]
                out[name] = (torch.cat([la, left.to(la.device)], 1), torch.cat([ra, right.to(ra.device)], 0))
            else:
                out[name] = (left, right)
        return LowRankDelta(out)

    def to(self, device: torch.device | str) -> "LowRankDelta":
        return LowRankDelta({n: (l.to(device), r.to(device)) for n, (l, r) in self.factors.items()})

    def dense(self, name: str) -> torch.Tensor:
        """The full d_out × d_in matrix. For tests and audits only: the edit path never calls it."""
        left, right = self.factors[name]
        return left @ right

    # ---- serialisation: safetensors bytes, bit-exact round trip ------------------------------

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        for i, (left, right) in enumerate(self.factors.values()):
            tensors[f"{i}.left"] = left.detach().to("cpu", torch.float32).contiguous()
            tensors[f"{i}.right"] = right.detach().to("cpu", torch.float32).contiguous()
        return st_save(tensors, metadata={"modules": json.dumps(self.modules), "format": "hiedit-lowrank-v1"})

    @classmethod
    def from_bytes(cls, blob: bytes) -> "LowRankDelta":
        tensors = st_load(blob)
        metadata = _metadata(blob)
        if metadata.get("format") != "hiedit-lowrank-v1":
            raise ValueError("blob is not a hiedit low-rank delta (format tag missing)")
        names = json.loads(metadata["modules"])
        return cls({n: (tensors[f"{i}.left"], tensors[f"{i}.right"]) for i, n in enumerate(names)})


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string (its JSON header)."""
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    return header.get("__metadata__", {})
