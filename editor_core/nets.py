"""HiEdit's two networks (arXiv 2604.11214 §4; reference notes §2 and §5).

Low level (MEND style, one net per weight shape, shared by the modules of that shape):

    h⁰ = norm([u_t ; δ_t])                                   D = d_in + d_out
    hⁱ = hⁱ⁻¹ + s_l ⊙ ReLU(hⁱ⁻¹ Aⁱ Bⁱ + bⁱ) + o_l              Aⁱ ~ N(0,1) [D×r], Bⁱ = 0 [r×D]
    [ũ_t ; δ̃_t] = hⁿ,        ΔW_l = -η_l Σ_t ũ_t δ̃_tᵀ           (η_l learned, per module)

B = 0, b = 0, s = 1, o = 0 make the net the identity at initialisation, so an untrained
editor is a scaled gradient step.

High level (router, Eq. 6-7):

    e_{l,t} = s_l ⊙ ReLU(W_enc norm([u_t ; δ_t]) + b_enc) + o_l    encoder shared per shape
    z       = mean_t [e_{1,t} ; … ; e_{L,t}]                       token-mean of all modules
    p       = W_g z + b_g                                          layer importances (logits)
    m       = onehot_topk(p, k) + p - sg(p)                        straight-through estimator
"""
from __future__ import annotations

import torch
from torch import nn


class RunningNorm(nn.Module):
    """Per-dimension running mean/std of rows of x, merged exactly (Chan et al.).

    Departure from the published code, which adds b·var instead of (b-1)·var to the M2
    sum: we keep the exact parallel-variance merge; a 1-row batch contributes no spread.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("n", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """x: [N, dim]."""
        x = x.detach().float()
        b = x.shape[0]
        if b == 0:
            return
        n = float(self.n)
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        delta = batch_mean - self.mean
        total = n + b
        self.mean += delta * (b / total)
        self.m2 += batch_m2 + delta.pow(2) * (n * b / total)
        self.n.fill_(total)

    @property
    def std(self) -> torch.Tensor:
        n = float(self.n)
        if n < 2:
            return torch.ones_like(self.m2)
        return (self.m2 / (n - 1)).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / (self.std + self.eps)


class EditorBlock(nn.Module):
    """hⁱ = h + s_l ⊙ ReLU(h A B + b) + o_l, with scale/offset after the ReLU as in RLEdit."""

    def __init__(self, dim: int, rank: int, n_modules: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(dim, rank))
        self.B = nn.Parameter(torch.zeros(rank, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Embedding(n_modules, dim)
        self.offset = nn.Embedding(n_modules, dim)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.offset.weight)

    def forward(self, h: torch.Tensor, module_idx: torch.Tensor) -> torch.Tensor:
        """h [n, D]; module_idx [n] (each row's module, so several modules share one matmul).

        The ReLU is ``clamp(min=0)``, as in the published code, and not ``torch.relu``: at
        initialisation h A B + b is exactly 0 (B = 0, b = 0), where torch.relu's gradient is 0 but
        clamp's is 1. With torch.relu, B, b and s would never receive a gradient and the net
        would stay the identity forever.
        """
        return h + self.scale(module_idx) * (h @ self.A @ self.B + self.bias).clamp(min=0) + self.offset(module_idx)


class LowLevelNet(nn.Module):
    """Maps per-token (u_t, δ_t) of one module to (ũ_t, δ̃_t); carries the learned edit lr η_l."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_modules: int, lr_init: float):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.norm = RunningNorm(dim)
        self.blocks = nn.ModuleList(EditorBlock(dim, min(rank, dim), n_modules) for _ in range(n_blocks))
        self.lr = nn.Embedding(n_modules, 1)
        nn.init.constant_(self.lr.weight, lr_init)

    def forward(self, u: torch.Tensor, delta: torch.Tensor, module_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [n, d_in], delta [n, d_out], module_idx [n] -> ũ [n, d_in], δ̃ [n, d_out]."""
        h = self.norm(torch.cat([u, delta], dim=-1))
        for block in self.blocks:
            h = block(h, module_idx)
        return h[:, : self.d_in], h[:, self.d_in:]

    def factors(self, us: list[torch.Tensor], deltas: list[torch.Tensor],
                module_idx: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """ΔW_l (nn.Linear layout, d_out × d_in) = left @ right, left = -η_l Δ̃ᵀ, right = Ũ, for several modules.

        us[i] [n_i, d_in], deltas[i] [n_i, d_out] of module module_idx[i]; the rows of all
        modules go through the blocks together. Returns [(left [d_out, n_i], right [n_i, d_in])],
        differentiable in the net's parameters.
        """
        sizes = [u.shape[0] for u in us]
        rows = torch.tensor([m for m, n in zip(module_idx, sizes) for _ in range(n)], device=us[0].device)
        u_t, d_t = self(torch.cat(us), torch.cat(deltas), rows)
        out = []
        for m, u_i, d_i in zip(module_idx, u_t.split(sizes), d_t.split(sizes)):
            out.append((-self.lr.weight[m, 0] * d_i.T, u_i))
        return out


class Router(nn.Module):
    """HiNet: layer importances p [L] from the token-mean gradient features of all L modules.

    ``shapes`` lists each module's (d_in, d_out) in module-index order; modules of one shape
    share an encoder and a normaliser and are told apart by their scale/offset embedding.
    """

    def __init__(self, shapes: list[tuple[int, int]], hidden: int):
        super().__init__()
        self.shapes = [tuple(s) for s in shapes]
        self.groups = sorted(set(self.shapes))
        self.index_in_group = [self._group_members(s).index(i) for i, s in enumerate(self.shapes)]
        self.encoders = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        self.scales = nn.ModuleDict()
        self.offsets = nn.ModuleDict()
        for shape in self.groups:
            key = self.key(shape)
            n_mod = len(self._group_members(shape))
            self.encoders[key] = nn.Linear(sum(shape), hidden)
            self.norms[key] = RunningNorm(sum(shape))
            self.scales[key] = nn.Embedding(n_mod, hidden)
            self.offsets[key] = nn.Embedding(n_mod, hidden)
            nn.init.ones_(self.scales[key].weight)
            nn.init.zeros_(self.offsets[key].weight)
        self.gate = nn.Linear(hidden * len(self.shapes), len(self.shapes))

    @staticmethod
    def key(shape: tuple[int, int]) -> str:
        return f"{shape[0]}x{shape[1]}"

    def _group_members(self, shape) -> list[int]:
        return [i for i, s in enumerate(self.shapes) if s == shape]

    def update_norms(self, keys: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Update the encoder normalisers (the published code never does; §5.1 quirk)."""
        for shape in self.groups:
            rows = [torch.cat([keys[i], grads[i]], -1) for i in self._group_members(shape)]
            self.norms[self.key(shape)].update(torch.cat(rows))

    def forward(self, keys: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        """keys[l] [n, d_in_l], grads[l] [n, d_out_l] for every module l -> p [L]."""
        feats: list[torch.Tensor] = [None] * len(self.shapes)  # type: ignore[list-item]
        for shape in self.groups:  # one encoder matmul for all modules of a shape
            key = self.key(shape)
            members = self._group_members(shape)
            sizes = [keys[l].shape[0] for l in members]
            x = torch.cat([torch.cat([keys[l], grads[l]], -1) for l in members])
            idx = torch.tensor([self.index_in_group[l] for l, n in zip(members, sizes) for _ in range(n)],
                               device=x.device)
            e = self.scales[key](idx) * torch.relu(self.encoders[key](self.norms[key](x))) + self.offsets[key](idx)
            for l, e_l in zip(members, e.split(sizes)):
                feats[l] = e_l.mean(0)  # token mean, per module
        return self.gate(torch.cat(feats))


def topk_ste(p: torch.Tensor, k: int) -> torch.Tensor:
    """m = onehot_topk(p, k) + p - sg(p): exactly 0/1 forward, identity gradient backward. p [L]."""
    if not 1 <= k <= p.shape[-1]:
        raise ValueError(f"k={k} is out of range: choose 1..{p.shape[-1]} modules")
    hard = torch.zeros_like(p).scatter_(-1, p.topk(k).indices, 1.0)
    return hard + p - p.detach()
