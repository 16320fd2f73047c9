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
like RLSEdit's. Solved as written that is a d_k × d_k system per layer and edit (d_k = 1536 on SmolLM2:
about 0.4 s of one core per layer). Here the inverse M_t = (P K_pᵀK_p + λ I)⁻¹ is carried instead, and
one edit is a Woodbury step (RLSEdit's recursion with P Kᵀ on the left), O(d_k² u):

    M_0 = I / λ            F = M_{t-1} P Kᵀ [d_k, u]      S = I_u + K F [u, u]
    G = F S⁻¹ (= M_t P Kᵀ, the closed form's gain)        M_t = M_{t-1} − G (K M_{t-1})

and forgetting an edit (a rollback, K_pᵀK_p −= KᵀK) is the downdate M ← M + F (I_u − K F)⁻¹ K M.

Departures from the public code, and why:
- **Thresholds relative to the statistics.** The code keeps the eigenvectors with eigenvalue < 2e-2
  and uses λ = L2 = 10, absolute numbers tuned to Llama-3-8B's keys and Wikipedia statistics. Keys of
  another model have another scale, so here the null space is the eigenvalues below
  ``null_rel`` · λ_max(Σ̂), and λ = ``l2_rel`` · tr(P Σ̂), the mean squared norm of a preserved key's
  null-space part (the scale at which P Kᵀ K enters the system). The defaults were chosen on SmolLM2's
  statistics (docs/results.md, AlphaEdit), not on the evaluation stream.
- **Statistics**: Σ̂ from RLSEdit's corpus (GLUE sentences, 50,000 tokens by default), not 100,000
  Wikipedia samples; the same Σ̂ feeds RLSEdit's prior, so the two methods see the same preserved keys.
- **The inverse carried, not the solve repeated** (above): equal in exact arithmetic; in float64 the
  recursion agrees with the closed form to ~1e-9 relative after hundreds of edits
  (tests/test_evaluate.py::test_alphaedit_recursion_equals_the_closed_form).
- **K_p from the proposal's keys.** The code recomputes the keys of every edited layer after all
  layers are updated; a layer's key depends only on the layers below it, which the proposal had
  already edited (through hooks) when it read the key, so the two are the same keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rlsedit import (RLSEditConfig, RLSEditor, SingularSystemError, check_keys, keys_digest,
                      precision_floor)


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
    """The closed form G = (P (K_pᵀK_p + KᵀK) + λ I)⁻¹ P Kᵀ  [d_k, u] (float64), for new keys K [u, d_k].

    The reference the recursion (``alphaedit_step``) is checked against; the editor does not solve it."""
    k = keys.to(P.dtype)
    system = P @ (kpkp + k.T @ k)
    system.diagonal().add_(lam)
    g = torch.linalg.solve(system, P @ k.T)
    if not bool(torch.isfinite(g).all()):
        raise SingularSystemError("AlphaEdit: the projected system is singular (the gain is not finite)")
    return g


def _woodbury(M: torch.Tensor, P: torch.Tensor, keys: torch.Tensor, sign: float, what: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """For M = (P A + λI)⁻¹ and A ± KᵀK: (F S⁻¹ [d_k, u], K M [u, d_k]) with F = M P Kᵀ, S = I ± K F,
    so the new inverse is M ∓ F S⁻¹ (K M)."""
    check_keys(keys, M.shape[0], what)
    k = keys.to(M.dtype)
    f = M @ (P @ k.T)                                              # F = M P Kᵀ [d_k, u]
    s = sign * (k @ f)
    s.diagonal().add_(1.0)                                         # S = I ± K F [u, u]
    if not bool(torch.isfinite(s).all()):
        raise SingularSystemError(f"{what}: the u×u system S = I ± K M P Kᵀ has non-finite entries")
    # relative to the keys (rlsedit.precision_floor); a det S threshold was absolute: it refused the downdate of
    # six keys with S = 10⁻³ each (det 10⁻¹⁸, accurate) and passed a key with S = 10⁻⁷ from ‖K‖² = 10⁷ (wrong by 4%)
    if float(torch.linalg.svdvals(s).min()) <= precision_floor(M, k):
        raise SingularSystemError(f"{what}: the u×u system S = I ± K M P Kᵀ is singular to working precision "
                                  "(rounding could be 1% of it)")
    g = torch.linalg.solve(s.T, f.T).T                             # F S⁻¹
    km = k @ M                                                     # K M [u, d_k]
    if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(km).all())):
        raise SingularSystemError(f"{what}: the gain is not finite")
    return g, km


def alphaedit_step(M: torch.Tensor, P: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The gain G = M_t P Kᵀ [d_k, u] for new keys K [u, d_k], M = M_{t-1} [d_k, d_k] left unchanged."""
    return _woodbury(M, P, keys, +1.0, "AlphaEdit update")[0]


class AlphaEditor(RLSEditor):
    """AlphaEdit bound to a model: RLSEdit's keys and values, the null-space-projected solve (module docstring).

    Attributes beyond RLSEditor's: P {module: projector [d_k, d_k] float64}, null_dim {module: dim of the
    null space}, lam {module: λ}, M {module: M_t = (P K_pᵀK_p + λ I)⁻¹ [d_k, d_k] float64}.
    """

    def __init__(self, model, tokenizer, cfg: RLSEditConfig, stats, params: AlphaEditParams | None = None):
        self.params: AlphaEditParams | None = None  # before RLSEditor.__init__, whose _init_state reads it
        self.M: dict[str, torch.Tensor] = {}
        super().__init__(model, tokenizer, cfg, stats)
        self.method = "alphaedit"
        if params is not None:  # RLSEditor.create builds without params; AlphaEditor.create configures after
            self.configure(params)

    def configure(self, params: AlphaEditParams) -> None:
        """P, its dimension and λ per layer for ``params``; M restarts at I / λ (no edit committed)."""
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
        self._init_state()

    def _init_state(self) -> None:
        """M_0 = I / λ per layer: no edit protected yet (needs the params: before configure, nothing)."""
        if self.params is not None:
            self.M = {n: torch.eye(self.P[n].shape[0], dtype=torch.float64, device=self.device) / self.lam[n]
                      for n in self.modules}

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
        return alphaedit_step(self.M[name], self.P[name], key)

    def _factors(self, keys: dict[str, torch.Tensor], sign: float) -> dict:
        """(F S⁻¹, K M) of M ← M ∓ F S⁻¹ K M for every layer in ``keys`` (sign −1: K_pᵀK_p += KᵀK, +1: −= KᵀK,
        the downdate of a rolled-back edit: its keys leave the protected set), each computed and checked
        (SingularSystemError), changing nothing."""
        factors = {}
        for name in self.modules:
            if name in keys:
                what = f"AlphaEdit {'update' if sign < 0 else 'downdate'} of {name}"
                factors[name] = _woodbury(self.M[name], self.P[name], keys[name].to(self.device), -sign, what)
        return factors

    def _apply(self, factors: dict, sign: float) -> None:
        for name, (g, km) in factors.items():
            self.M[name].addmm_(g, km, alpha=sign)

    def _commit_keys(self, edit_id: int, keys: dict[str, torch.Tensor]) -> None:
        """K_pᵀ K_p += Kᵀ K for every layer the edit wrote (the public code's cache_c update), as M's update."""
        if edit_id in self.history:
            raise ValueError(f"edit {edit_id} is already committed to the AlphaEdit state")
        self._update_all(keys, -1.0)
        self.history[edit_id] = keys_digest(keys)

    # ---- snapshots (a resumed evaluation: RLSEditor.save_state / load_state with M in place of C) ----

    def _signature(self) -> dict:
        if self.params is None:
            raise ValueError("AlphaEditor: configure(params) before saving or loading a state")
        return {**super()._signature(), "null_rel": self.params.null_rel, "l2_rel": self.params.l2_rel,
                "state": "M = (P K_pᵀK_p + λI)⁻¹"}

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """M per layer ("M.<i>", [d_k, d_k] float64): P and λ follow from the statistics and params."""
        return {f"M.{i}": self.M[n].detach().cpu().contiguous() for i, n in enumerate(self.modules)}

    def _set_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.M = {n: tensors[f"M.{i}"].to(self.device, torch.float64).contiguous()
                  for i, n in enumerate(self.modules)}
