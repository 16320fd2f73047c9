"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's keys and values, the update projected onto the null space
of the preserved knowledge's keys.

Keys, the target value z and the residual spread over the edited layers are MEMIT's, and come
unchanged from ``editor_core.memit.MemitEditor`` through ``editor_core.rlsedit.RLSEditor`` (subject
token, context prefixes, scale-aware z optimisation, the partly edited model emulated with hooks).
Only the per-layer solve differs. In the row convention of rlsedit.py (a key k ∈ R^{d_k} maps to k W, W = weightᵀ), with

    K_0       keys of preserved knowledge, summarised by their second moment Σ̂ = E[k kᵀ] (the statistics
              RLSEdit already collects, cached per model and layer)
    P         projector onto the null space of K_0: P = Û Ûᵀ, Û the eigenvectors of Σ̂ whose eigenvalue
              is below the threshold, so Σ̂ P ≈ 0 and an update ΔW = P Δ leaves K_0's outputs alone
    K_p       the keys of every earlier edit, accumulated as K_pᵀ K_p (the public code's ``cache_c``)
    K, R      this edit's key [u, d_k] and residual [u, d_v] at this layer (R = (z − h) / (L_e − i))

the update is the public code's closed form (AlphaEdit_main.py):

    Δ_row = (P (K_pᵀ K_p + Kᵀ K) + λ I)⁻¹ P Kᵀ R           [d_k, d_v], i.e. G = (…)⁻¹ P Kᵀ [d_k, u]

and after the edit K_pᵀ K_p += Kᵀ K. The update is low-rank (rank u), kept as the two factors Rᵀ, Gᵀ
like RLSEdit's. It is a d_k × d_k solve per layer and edit (d_k = 1536 on SmolLM2).

Departures from the public code, and why:
- **Thresholds relative to the statistics.** The code keeps the eigenvectors with eigenvalue < 2e-2
  and uses λ = L2 = 10, absolute numbers tuned to Llama-3-8B's keys and Wikipedia statistics. Keys of
  another model have another scale, so here the null space is the eigenvalues below
  ``null_rel`` · λ_max(Σ̂), and λ = ``l2_rel`` · tr(P Σ̂), the mean squared norm of a preserved key's
  null-space part (the scale at which P Kᵀ K enters the system). The defaults were chosen on SmolLM2's
  statistics (docs/results.md, AlphaEdit), not on the evaluation stream.
- **Statistics**: Σ̂ from RLSEdit's corpus (GLUE sentences, 50,000 tokens by default), not 100,000
  Wikipedia samples; the same Σ̂ feeds RLSEdit's prior, so the two methods see the same preserved keys.
- **K_p from the proposal's keys.** The code recomputes the keys of every edited layer after all
  layers are updated; a layer's key depends only on the layers below it, which the proposal had
  already edited (through hooks) when it read the key, so the two are the same keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rlsedit import RLSEditConfig, RLSEditor, SingularSystemError, keys_digest


@dataclass(frozen=True)
class AlphaEditParams:
    """AlphaEdit's own two settings (everything else is RLSEditConfig: layers, fact token, z, statistics)."""

    null_rel: float = 1e-2    # null space: eigenvalues of Σ̂ below null_rel · λ_max (public code: < 2e-2 absolute)
    l2_rel: float = 1.0       # λ = l2_rel · tr(P Σ̂) (public code: L2 = 10 absolute)

    def __post_init__(self) -> None:
        if not 0.0 < self.null_rel < 1.0:
            raise ValueError(f"null_rel must be in (0, 1), not {self.null_rel}")
        if not self.l2_rel > 0.0:
            raise ValueError(f"l2_rel must be > 0, not {self.l2_rel}")


def null_space_projector(sigma: torch.Tensor, null_rel: float) -> tuple[torch.Tensor, int]:
    """P = Û Ûᵀ over the eigenvectors of Σ̂ [d_k, d_k] with eigenvalue < null_rel · λ_max; (P float64, dim)."""
    evals, evecs = torch.linalg.eigh(sigma.double())
    null = evecs[:, evals < null_rel * float(evals.max())]
    if null.shape[1] == 0:
        raise SingularSystemError(f"Σ̂ has no eigenvalue below {null_rel:g} · λ_max: the null space is empty "
                                  "(raise null_rel)")
    return null @ null.T, int(null.shape[1])


def alphaedit_gain(P: torch.Tensor, kpkp: torch.Tensor, keys: torch.Tensor, lam: float) -> torch.Tensor:
    """G = (P (K_pᵀK_p + KᵀK) + λ I)⁻¹ P Kᵀ  [d_k, u] (float64), for new keys K [u, d_k]."""
    k = keys.to(P.dtype)
    system = P @ (kpkp + k.T @ k)
    system.diagonal().add_(lam)
    g = torch.linalg.solve(system, P @ k.T)
    if not bool(torch.isfinite(g).all()):
        raise SingularSystemError("AlphaEdit: the projected system is singular (the gain is not finite)")
    return g


class AlphaEditor(RLSEditor):
    """AlphaEdit bound to a model: RLSEdit's keys and values, the null-space-projected solve (module docstring).

    Attributes beyond RLSEditor's: P {module: projector [d_k, d_k] float64}, null_dim {module: dim of the
    null space}, lam {module: λ}, kpkp {module: K_pᵀ K_p [d_k, d_k] float64}.
    """

    def __init__(self, model, tokenizer, cfg: RLSEditConfig, stats, params: AlphaEditParams | None = None):
        super().__init__(model, tokenizer, cfg, stats)
        self.method = "alphaedit"
        self.params: AlphaEditParams | None = None
        self.kpkp: dict[str, torch.Tensor] = {}
        if params is not None:  # RLSEditor.create builds without params; AlphaEditor.create configures after
            self.configure(params)

    def configure(self, params: AlphaEditParams) -> None:
        """P, its dimension and λ per layer for ``params``; K_pᵀ K_p restarts empty (no edit committed)."""
        if self.history:
            raise ValueError("AlphaEdit: configure() before any edit is committed")
        self.params = params
        self.P: dict[str, torch.Tensor] = {}
        self.null_dim: dict[str, int] = {}
        self.lam: dict[str, float] = {}
        for name in self.modules:
            sigma = self.sigma[name].double()
            P, dim = null_space_projector(sigma, params.null_rel)
            self.P[name] = P.to(self.device)
            self.null_dim[name] = dim
            self.lam[name] = float(params.l2_rel * torch.trace(P @ sigma))
            self.kpkp[name] = torch.zeros_like(self.P[name])

    @classmethod
    def create(cls, model, tokenizer, layers: str | None = None, cfg: RLSEditConfig | None = None,
               stats=None, params: AlphaEditParams | None = None, **overrides) -> "AlphaEditor":
        """Like RLSEditor.create (layers, statistics, RLSEditConfig overrides), plus AlphaEdit's params."""
        editor = super().create(model, tokenizer, layers=layers, cfg=cfg, stats=stats, **overrides)
        editor.configure(params or AlphaEditParams())
        return editor

    def _gain(self, name: str, key: torch.Tensor) -> torch.Tensor:
        if self.params is None:
            raise ValueError("AlphaEditor: configure(params) before proposing (AlphaEditor.create does)")
        return alphaedit_gain(self.P[name], self.kpkp[name], key, self.lam[name])

    def _commit_keys(self, edit_id: int, keys: dict[str, torch.Tensor]) -> None:
        """K_pᵀ K_p += Kᵀ K for every layer the edit wrote (the public code's cache_c update)."""
        if edit_id in self.history:
            raise ValueError(f"edit {edit_id} is already committed to the AlphaEdit state")
        for name, k in keys.items():
            k64 = k.to(self.device, torch.float64)
            self.kpkp[name] += k64.T @ k64
        self.history[edit_id] = keys_digest(keys)

    def forget(self, edit_id: int, state_blob: bytes | None) -> None:
        """After a rollback: K_pᵀ K_p −= Kᵀ K (the edit's keys, from its logged ``state_blob``, leave the
        protected set)."""
        if edit_id not in self.history:
            return
        for name, k in self._logged_keys(edit_id, state_blob).items():
            k64 = k.to(self.device, torch.float64)
            self.kpkp[name] -= k64.T @ k64
        del self.history[edit_id]

    # ---- snapshots (a resumed evaluation: RLSEditor.save_state / load_state with K_pᵀ K_p in place of C) ----

    def _signature(self) -> dict:
        if self.params is None:
            raise ValueError("AlphaEditor: configure(params) before saving or loading a state")
        return {**super()._signature(), "null_rel": self.params.null_rel, "l2_rel": self.params.l2_rel}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """K_pᵀ K_p per layer ("kpkp.<i>", [d_k, d_k] float64): P and λ follow from the statistics and params."""
        return {f"kpkp.{i}": self.kpkp[n].detach().cpu().contiguous() for i, n in enumerate(self.modules)}

    def _set_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.kpkp = {n: tensors[f"kpkp.{i}"].to(self.device, torch.float64).contiguous()
                     for i, n in enumerate(self.modules)}
