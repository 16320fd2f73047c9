"""RLSEdit (arXiv 2601.15686): training-free sequential editing by recursive least squares.

Each edited ``down_proj`` (row convention: a key k ∈ R^{d_k} maps to k W, W = weightᵀ ∈ R^{d_k×d_v})
keeps the inverse Gram matrix of everything it has been asked to fit::

    W*_t = argmin_W  Σ_{i≤t} ‖K_i W − V_i‖² + α ‖W − W_0‖² + β w ‖Σ̂^{1/2} (W − W_0)‖²
    A_t  = α I + β w Σ̂ + Σ_{i≤t} K_iᵀ K_i          C_t = A_t⁻¹              [d_k, d_k]

and one edit (u keys K_t [u, d_k], innovation E_t [u, d_v]) is the Woodbury step::

    F = C_{t-1} K_tᵀ           S = I_u + K_t F  (u × u, the only system solved)
    G = F S⁻¹ (= C_t K_tᵀ)     C_t = C_{t-1} − F S⁻¹ Fᵀ
    W*_t = W*_{t-1} + G E_t    i.e. ΔW (nn.Linear layout) = E_tᵀ Gᵀ, kept as two factors

With the *principled* targets V_t = K_t W*_{t-1} + R (reference §1.5) the innovation is the
MEMIT residual itself, E_t = R. Keys K_t, the target value z and the residual R = (z − h) / (L_e − i)
of layer i of the L_e edited layers are MEMIT's (reference §3), read by memit.MemitEditor, which
RLSEditor extends; the subject whose last token is the fact token comes from subject.find_subject.

The editor follows the Editor protocol: ``propose`` changes neither the model nor C (the partly
edited model that MEMIT's spreading needs is emulated with thread-local forward hooks, so
concurrent generation never sees it); ``commit`` runs the Woodbury update with the keys the
proposal logged; ``forget`` runs the downdate (A ← A − KᵀK), so C equals never having seen
that edit; ``restore`` replays ``commit`` from the log. ``reset_every_edit=True`` is the
``memit-nohist`` baseline: C stays C_0 (what the public code does), so every edit is plain MEMIT.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save
from torch import nn

from .capture import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_TARGET_TOKENS, EditInputError, target_loss, teacher_forced
from .delta import LowRankDelta, _metadata
from .editor import EditRequest, Proposal
from .memit import MemitEditor, post_norm_mlp
from .model import decoder_layers, model_id, resolve_modules
from .state import tensor_digest
from .stats import SecondMoment, cached_second_moments, load_second_moments, stats_fingerprint
from .subject import find_subject

KEYS_FORMAT = "hiedit-rlsedit-keys-v1"
STATE_FORMAT = "hiedit-rlsedit-state-v2"  # v1 also held every committed key
C_DTYPES = {"float64": torch.float64, "float32": torch.float32}
FACT_TOKENS = ("auto", "subject_last", "last")


# ---- errors -------------------------------------------------------------------------------------

class SingularSystemError(ValueError):
    """A Woodbury system (or A_0) that is singular, indefinite or non-finite: nothing was changed."""


class RLSStateMismatch(ValueError):
    """A key blob or state snapshot made by an editor with other layers, statistics or settings."""


# ---- configuration --------------------------------------------------------------------------------

@dataclass
class RLSEditConfig:
    """Every RLSEdit option. Paper symbols: α (alpha), β (beta), w (mom2_weight)."""

    layers: str = ""                     # layer spec, e.g. "down[4-8]"; "" = default_layer_spec(model)
    # Where keys are read and δ is added (MEMIT's repr_tools names): "subject_last" (the paper, MEMIT),
    # "last" (the last prompt token), "auto" = default_fact_token(number of decoder layers).
    fact_token: str = "auto"
    alpha: float | None = None           # α ‖W − W_0‖²; None = 1e-3 · mean diag(w Σ̂) per layer (keeps A_0 SPD)
    beta: float = 1.0                    # β: weight of the anchor term β w Σ̂
    mom2_weight: float | None = None     # w; None = default_mom2_weight(d_k, fact_token)
    c_dtype: str = "float64"             # precision of C; float32 is re-symmetrised after every step
    reset_every_edit: bool = False       # True = memit-nohist: C is C_0 before every edit
    innovation: str = "principled"       # "principled": E = R; "reference": the public code's (V − K W)/(L_e − i)
    # keys (reference §3.1)
    n_contexts: int = 5                  # context prefixes averaged with the plain prompt
    context_mode: str = "fixed"          # "fixed": seeded pick from a built-in pool; "generate": sampled by the model
    context_tokens: int = 10             # length of generated prefixes
    seed: int = 0
    # target value z (reference §3.2). Scale-aware where MEMIT's settings are in absolute units: the
    # published v_lr (0.1 Llama, 0.5 GPT-J) and the decay ‖δ‖/‖h‖² were tuned for those models' ‖h‖. The
    # demo model's residual stream has ‖h‖ ≈ 1,500-2,000 at d = 192, where lr 0.1 moved δ to ~2% of ‖h‖
    # in 25 steps (target NLL 9.5 on average after them, 0 of 100 facts flipped).
    v_lr: float | None = None            # absolute Adam lr on δ; None = v_lr_scale · ‖h_init‖ / √d_v
    # Adam moves every coordinate by about lr per step, so ‖δ‖ after one step is ≈ lr·√d_v: the default
    # makes the first step half of ‖h_init‖. (On Llama-3-8B, d_v = 4096, the published 0.1 is this rule
    # at ‖h‖ ≈ 13.) Measured on the demo: scales 0.1-1.0 end at the same NLL; 0.5 needs ~9 steps.
    # None = default_v_lr_scale(model): 0.5, or 0.05 where the MLP output is normalised (Gemma-2/3).
    v_lr_scale: float | None = None
    v_steps: int = 25
    v_weight_decay: float = 0.05         # · ‖δ‖ / ‖h_init‖ (dimensionless; MEMIT's ‖δ‖/‖h‖² depends on units)
    kl_factor: float = 0.0625            # · KL(p_now ‖ p_init) on kl_prompt
    kl_prompt: str = "{} is a"
    clamp_norm_factor: float = 1.0       # ‖δ‖ ≤ clamp · ‖h_init‖ (MEMIT 0.75; demo facts need 0.7-0.9 ‖h‖)
    early_stop_loss: float = 5e-2        # stop once the target NLL (not NLL + KL + decay) is below this
    # second-moment statistics (reference §3.4)
    stats_corpus: str | None = None      # text/JSON file or directory; None = shared/data/glue
    # 50k tokens: ~65x the demo model's d_k (768), a well-conditioned Σ̂ in ~15 s on 2 cores; raise it for
    # production models (d_k = 14336 wants a few hundred thousand) — the result is cached per model.
    stats_max_tokens: int | None = 50_000
    stats_max_length: int = 128
    stats_batch_size: int = 16
    cache_dir: str | None = None         # None = $HIEDIT_HOME/cache/rlsedit-stats or the user cache dir
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    max_target_tokens: int = DEFAULT_MAX_TARGET_TOKENS

    def __post_init__(self) -> None:
        if self.c_dtype not in C_DTYPES:
            raise ValueError(f"c_dtype must be one of {sorted(C_DTYPES)}, not {self.c_dtype!r}")
        if self.innovation not in ("principled", "reference"):
            raise ValueError(f"innovation must be 'principled' or 'reference', not {self.innovation!r}")
        if self.context_mode not in ("fixed", "generate"):
            raise ValueError(f"context_mode must be 'fixed' or 'generate', not {self.context_mode!r}")
        if self.alpha is not None and not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number >= 0, not {self.alpha}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta must be a finite number >= 0, not {self.beta}")
        if self.mom2_weight is not None and not (self.mom2_weight >= 0 and math.isfinite(self.mom2_weight)):
            raise ValueError(f"mom2_weight must be a finite number >= 0, not {self.mom2_weight}")
        if self.n_contexts < 0 or self.v_steps < 1:
            raise ValueError("n_contexts must be >= 0 and v_steps >= 1")
        if self.fact_token not in FACT_TOKENS:
            raise ValueError(f"fact_token must be one of {FACT_TOKENS}, not {self.fact_token!r}")
        if self.v_lr is not None and not (self.v_lr > 0 and math.isfinite(self.v_lr)):
            raise ValueError(f"v_lr must be a finite number > 0 (or None for v_lr_scale), not {self.v_lr}")
        if self.v_lr_scale is not None and not (self.v_lr_scale > 0 and math.isfinite(self.v_lr_scale)):
            raise ValueError(f"v_lr_scale must be a finite number > 0 (or None for the model's default), "
                             f"not {self.v_lr_scale}")
        if "{}" not in self.kl_prompt:
            raise ValueError(f"kl_prompt must contain '{{}}' for the subject, not {self.kl_prompt!r}")

    @property
    def method(self) -> str:
        return "memit-nohist" if self.reset_every_edit else "rlsedit"


# Models up to this depth are edited at the last token by default (default_fact_token).
SMALL_MODEL_LAYERS = 8


def default_fact_token(num_layers: int) -> str:
    """"subject_last" (MEMIT, the paper) for deep models; "last" for models of <= SMALL_MODEL_LAYERS layers.

    MEMIT's causal tracing put the fact recall of GPT-2 XL / GPT-J in mid-layer MLPs at the subject's
    last token. The 6-layer demo model recalls facts elsewhere (docs/rlsedit.md, "Causal tracing"):
    restoring the clean subject-last state after layer l recovers at most 0.24 of P(true) (0.12 when
    corrupted, 0.98 clean), restoring the last token's state recovers 0.44 after layer 0 and 0.93
    after layer 3; and no δ added at the subject's last token, of any norm, flips more than a quarter
    of the facts, while one at the last token flips 96%. A shallow model copies the subject to the
    last position in its first layer and looks the fact up there, so that is where it is edited.
    """
    return "last" if num_layers <= SMALL_MODEL_LAYERS else "subject_last"


def default_layer_spec(num_layers: int, fact_token: str = "subject_last") -> str:
    """The edited down_proj layers by default.

    subject_last: a few lower-middle layers, 4-8 of Llama-3-8B's 32 (the published setting), 1-2 of
    a 4-6 layer model. At least one decoder layer stays above the last edited one: its attention is
    what carries the edit from the subject's token to the position that predicts the target.
    last: the one layer L-3, down[3] of the 6-layer demo model: where restoring the last token's
    state recovers the fact (0.44 after layer 0, 0.57, 0.77, 0.93 after layer 3, 0.96 after 4) and
    where z is optimised. One layer, not the spread over 1..L-3 that MEMIT would use: on a shallow
    model every edit of a lower layer moves the keys of the layers above it, for every earlier fact,
    so the history in C goes stale; with one edited layer the keys of past edits never change. On a
    600-edit dev stream this kept early edits far better (Edited Retention 74.2 vs 42.5 at the same w,
    docs/rlsedit.md, "One edited layer").
    """
    if fact_token == "last":
        return f"down[{max(0, num_layers - 3)}]"
    top = max(0, num_layers - 2)
    lo = min(max(1, round(num_layers * 0.125)), top)
    hi = min(top, lo + min(5, max(2, num_layers // 4)) - 1)
    return f"down[{lo}-{hi}]"


# w of the last-token regime, as a multiple of the paper's width-scaled w. One layer carries the whole
# residual of every edit there, and a stronger prior keeps the unedited facts: on the 600-edit dev stream
# w = 2,400 (3x) had the best trade of the grid 804 / 1,600 / 2,400 / 4,000 / 6,000 (docs/rlsedit.md).
LAST_TOKEN_PRIOR_FACTOR = 3.0


def default_v_lr_scale(model: nn.Module) -> float:
    """z's Adam lr as a fraction of ‖h_init‖ / √d_v (RLSEditConfig.v_lr_scale).

    0.5 where down_proj writes the residual directly (Llama, the demo). Where the MLP output is
    normalised first (Gemma-2/3), one layer can only write a change of about its post-norm gain's size,
    a fraction of ‖h‖ (Gemma-3-270M's layers 2-5 at a subject token: ‖o‖ ≈ 100-900 against ‖h‖ ≈
    1,000-4,000): at 0.5, δ reached the clamp ‖h‖ in a few steps, a target no spread of the edited
    layers delivers. 0.05 was chosen on 8 facts of the development stream (docs/models.md).
    """
    return 0.05 if post_norm_mlp(model) else 0.5


def default_mom2_weight(d_k: int, fact_token: str = "subject_last") -> float:
    """w: the paper's 15000 at Llama-3-8B's d_k = 14336, scaled to width; 3x that for fact_token "last"."""
    w = 15000.0 * d_k / 14336
    return w * LAST_TOKEN_PRIOR_FACTOR if fact_token == "last" else w


# ---- the recursion: pure functions on tensors -------------------------------------------------------

def initial_inverse(sigma: torch.Tensor, alpha: float, beta: float, weight: float,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """C_0 = (α I + β w Σ̂)⁻¹ via Cholesky. sigma [d_k, d_k] -> [d_k, d_k] in ``dtype``."""
    a0 = beta * weight * sigma.to(torch.float64)
    a0 = (a0 + a0.T) / 2
    a0.diagonal().add_(alpha)
    if not bool(torch.isfinite(a0).all()):
        raise SingularSystemError("A_0 = αI + βwΣ̂ has non-finite entries: the statistics are corrupt")
    chol, info = torch.linalg.cholesky_ex(a0)
    if int(info) != 0:
        raise SingularSystemError(
            f"A_0 = αI + βwΣ̂ is not positive definite (α={alpha:g}, β={beta:g}, w={weight:g}): "
            "set alpha > 0 or collect statistics from more text")
    c0 = torch.cholesky_inverse(chol)
    return ((c0 + c0.T) / 2).to(dtype).contiguous()


def precision_floor(C: torch.Tensor, keys: torch.Tensor, symmetric: bool = False) -> float:
    """100 · eps · (1 + ‖K‖_F² ‖C‖₂): K C Kᵀ carries rounding of order eps·‖K‖²‖C‖, so a u×u system
    S = I ± K C Kᵀ whose smallest eigenvalue is below this may be more than 1% rounding (a downdate's S is a
    difference of such terms) and is refused. Relative to the keys and dtype: an absolute threshold refused
    accurate downdates of large keys and passed wrong ones. ‖C‖₂ ≤ √(‖C‖₁‖C‖_∞) keeps it O(d_k²); for a
    symmetric C (RLSEdit's) ‖C‖₁ = ‖C‖_∞, so one pass over C gives it."""
    c1 = float(torch.linalg.matrix_norm(C, ord=1))
    c_norm = c1 if symmetric else math.sqrt(c1 * float(torch.linalg.matrix_norm(C, ord=math.inf)))
    return 100.0 * torch.finfo(C.dtype).eps * (1.0 + float(keys.double().square().sum()) * c_norm)


def _cholesky(s: torch.Tensor, what: str, floor: float) -> torch.Tensor:
    """Lower Cholesky factor of the u×u system ``s``, or SingularSystemError when a pivot² is below ``floor``
    (precision_floor: relative to the keys; an absolute threshold refused accurate downdates of large keys)."""
    if not bool(torch.isfinite(s).all()):
        raise SingularSystemError(f"{what}: the u×u system S has non-finite entries")
    chol, info = torch.linalg.cholesky_ex((s + s.T) / 2)
    pivots = chol.diagonal()
    if int(info) != 0 or not bool(torch.isfinite(chol).all()) or float(pivots.min() ** 2) <= floor:
        raise SingularSystemError(f"{what}: the u×u system S is singular or indefinite "
                                  f"(C is no longer positive definite, or the keys are degenerate)")
    return chol


def check_keys(keys: torch.Tensor, d_k: int, what: str) -> None:
    """Refuse keys that are not a finite, non-empty [u, d_k] matrix (SingularSystemError)."""
    if keys.dim() != 2 or keys.shape[1] != d_k or keys.shape[0] == 0:
        raise SingularSystemError(f"{what}: keys must be [u, {d_k}], got {tuple(keys.shape)}")
    if not bool(torch.isfinite(keys).all()):
        raise SingularSystemError(f"{what}: keys contain NaN or inf")


def keys_digest(keys: dict[str, torch.Tensor]) -> str:
    """sha256 over the module names and float32 bytes of one edit's keys {module: K [u, d_k]}."""
    h = hashlib.sha256()
    for name in sorted(keys):
        h.update(name.encode())
        h.update(tensor_digest(keys[name].detach().float().cpu()).encode())
    return h.hexdigest()


def rls_gain(C: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Woodbury update for new keys K [u, d_k]: returns (G, M), both [d_k, u] in C's dtype.

        F = C Kᵀ,  S = I + K F = L Lᵀ,  M = F L⁻ᵀ,  G = M L⁻¹ = F S⁻¹ = C_t Kᵀ,  C_t = C − M Mᵀ
    """
    check_keys(keys, C.shape[0], "RLS update")
    k = keys.to(C.dtype)
    f = C @ k.T                                                     # F [d_k, u]
    s = k @ f
    s.diagonal().add_(1.0)                                          # S = I + K C Kᵀ [u, u]
    chol = _cholesky(s, "RLS update", precision_floor(C, k, symmetric=True))
    m = torch.linalg.solve_triangular(chol, f.T, upper=False).T     # M = F L⁻ᵀ
    g = torch.linalg.solve_triangular(chol.T, m.T, upper=True).T    # G = M L⁻¹ = F S⁻¹
    if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(m).all())):
        raise SingularSystemError("RLS update: the gain is not finite")
    return g, m


def rls_downdate_factor(C: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Woodbury downdate (A ← A − KᵀK): returns M [d_k, u] with C' = C + M Mᵀ.

        F = C Kᵀ,  S = I − K F = L Lᵀ (positive definite iff KᵀK was part of A),  M = F L⁻ᵀ
    """
    check_keys(keys, C.shape[0], "RLS downdate")
    k = keys.to(C.dtype)
    f = C @ k.T
    s = -(k @ f)
    s.diagonal().add_(1.0)
    chol = _cholesky(s, "RLS downdate", precision_floor(C, k, symmetric=True))
    m = torch.linalg.solve_triangular(chol, f.T, upper=False).T
    if not bool(torch.isfinite(m).all()):
        raise SingularSystemError("RLS downdate: the correction is not finite")
    return m


def check_correction(C: torch.Tensor, m: torch.Tensor, what: str) -> None:
    """Refuse a rank-u correction ±M Mᵀ that could overflow C's dtype (checked before any change)."""
    largest = float(m.abs().max()) if m.numel() else 0.0
    if not largest < math.sqrt(torch.finfo(C.dtype).max / 4 / max(1, m.shape[1])):  # u · max|M|² < max/4
        raise SingularSystemError(f"{what}: the correction M Mᵀ would overflow {C.dtype}")


def apply_correction(C: torch.Tensor, m: torch.Tensor, sign: float) -> None:
    """C ← C + sign · M Mᵀ in place (check_correction first). float32 C is re-symmetrised."""
    C.addmm_(m, m.T, alpha=sign)
    if C.dtype != torch.float64:
        # C ← (C + Cᵀ)/2; a contiguous copy of Cᵀ is ~5× faster than adding the strided view
        C.add_(C.T.clone(memory_format=torch.contiguous_format)).mul_(0.5)


def rls_step(C: torch.Tensor, keys: torch.Tensor, innovation: torch.Tensor) -> torch.Tensor:
    """One full RLS step in place on C; returns the row-layout weight change G E [d_k, d_v]."""
    g, m = rls_gain(C, keys)
    check_correction(C, m, "RLS update")
    apply_correction(C, m, -1.0)
    return g @ innovation.to(g.dtype)


# ---- the editor ------------------------------------------------------------------------------------------

class RLSEditor(MemitEditor):
    """RLSEdit bound to a model: per-layer C matrices, proposals as low-rank deltas G·R.

    Keys, z and the forward passes on the partly edited model are MEMIT's (memit.MemitEditor).

    Attributes beyond MemitEditor's (modules, module_map, layer_of, z_layer, contexts):
        C:       {module: C_t [d_k, d_k]} on the model's device, in cfg.c_dtype
        history: {edit_id: digest of its keys} of committed edits (rlsedit only); the keys themselves are
                 in the log (the proposal's state_blob), read back by ``forget``
    """

    def __init__(self, model: nn.Module, tokenizer, cfg: RLSEditConfig, stats: dict[str, SecondMoment]):
        if cfg.fact_token == "auto":
            cfg = replace(cfg, fact_token=default_fact_token(len(decoder_layers(model))))
        if cfg.v_lr_scale is None:
            cfg = replace(cfg, v_lr_scale=default_v_lr_scale(model))
        super().__init__(model, tokenizer, cfg)
        self.method = cfg.method
        missing = [n for n in self.modules if n not in stats]
        if missing:
            raise ValueError(f"stats: no second-moment statistics for {missing}")
        self.c_dtype = C_DTYPES[cfg.c_dtype]
        self.sigma: dict[str, torch.Tensor] = {}
        self.alpha: dict[str, float] = {}
        self.weight: dict[str, float] = {}
        self.C: dict[str, torch.Tensor] = {}
        for name in self.modules:
            sigma = stats[name].sigma.to(torch.float32).cpu()
            d_k = self.module_map[name].in_features
            if tuple(sigma.shape) != (d_k, d_k):
                raise ValueError(f"stats: Σ̂ of {name} is {tuple(sigma.shape)}, the module takes {d_k} inputs")
            w = cfg.mom2_weight if cfg.mom2_weight is not None else default_mom2_weight(d_k, cfg.fact_token)
            alpha = cfg.alpha if cfg.alpha is not None else \
                max(1e-3 * w * float(sigma.diagonal().double().mean()), 1e-8)
            self.sigma[name], self.alpha[name], self.weight[name] = sigma, float(alpha), float(w)
        self._init_state()
        self.stats_digest = {n: tensor_digest(self.sigma[n]) for n in self.modules}
        self.fingerprints = {n: stats[n].meta.get("fingerprint") or stats_fingerprint(model, self.layer_of[n])
                             for n in self.modules}
        self.history: dict[int, str] = {}

    def reset(self) -> None:
        """C back to C_0, no edit committed."""
        self.history = {}
        self._init_state()

    def _init_state(self) -> None:
        """C_0 = (α I + β w Σ̂)⁻¹ per layer (AlphaEditor overrides: its state is M)."""
        for name in self.modules:
            self.C[name] = initial_inverse(self.sigma[name].to(self.device), self.alpha[name], self.cfg.beta,
                                           self.weight[name], self.c_dtype)

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def create(cls, model: nn.Module, tokenizer, layers: str | None = None, cfg: RLSEditConfig | None = None,
               stats: str | Path | dict | None = None, **overrides) -> "RLSEditor":
        """An editor for ``model``, with C_0 built from second-moment statistics.

        layers:    overrides cfg.layers ("" or None: default_layer_spec)
        stats:     None (collect on first use, cached on disk per model fingerprint and layer),
                   a statistics directory/file (refused if made for another model), or
                   {module: SecondMoment | Σ̂ tensor}
        overrides: RLSEditConfig fields, e.g. alpha=0.0, reset_every_edit=True
        """
        cfg = RLSEditConfig(**{**(asdict(cfg) if cfg is not None else {}), **overrides})
        if layers:
            cfg.layers = layers
        n_layers = len(decoder_layers(model))
        if cfg.fact_token == "auto":
            cfg.fact_token = default_fact_token(n_layers)
        if not cfg.layers:
            cfg.layers = default_layer_spec(n_layers, cfg.fact_token)
        modules = resolve_modules(model, cfg.layers)
        if isinstance(stats, dict):
            stats = {n: s if isinstance(s, SecondMoment) else SecondMoment(n, torch.as_tensor(s), 0, {})
                     for n, s in stats.items()}
        elif stats is not None:
            stats = load_second_moments(stats, model, modules)
        else:
            stats = cached_second_moments(model, tokenizer, modules, cfg.stats_corpus, cfg.cache_dir,
                                          cfg.stats_max_tokens, cfg.stats_max_length, cfg.stats_batch_size)
        return cls(model, tokenizer, cfg, stats)

    # ---- the edit path ------------------------------------------------------------------------------------

    def propose(self, request: EditRequest, k: int | None = None) -> Proposal:
        """Keys, z, and the per-layer RLS deltas G·R. Changes neither the model nor C."""
        if k is not None and k != len(self.modules):
            raise EditInputError(f"k: RLSEdit edits every layer of its spec; k must be {len(self.modules)} or omitted")
        example = teacher_forced(self.tokenizer, request.prompt, request.target,
                                 self.cfg.max_prompt_tokens, self.cfg.max_target_tokens)
        subject = find_subject(request.prompt, request.subject)
        with torch.no_grad():
            logits = self.model(input_ids=example.input_ids.to(self.device), use_cache=False).logits
            loss_before = float(target_loss(logits, example.labels.to(self.device)))
        z, info = self._value(subject, request.prompt, request.target)
        key_rows, key_idx = [], []  # the same fact token as z's (cfg.fact_token), in every context
        for ctx in self.contexts:
            ids, i = self._fact_index(ctx + request.prompt, len(ctx) + subject.end)
            key_rows.append(ids)
            key_idx.append(i)
        overrides: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        keys, resids = {}, {}
        n_layers = len(self.modules)
        for i, name in enumerate(self.modules):
            # K [1, d_k], on the partly edited model
            key, h, y = self._keys_and_state(name, key_rows, key_idx, overrides)
            full = self._to_down_space(name, z - h, y)                            # z − h in down_proj output space
            if self.cfg.innovation == "principled":
                innov = full / (n_layers - i)                                     # E = R = (z − h)/(L_e − i)
            else:  # the public code: V = z − h, E = (V − K W_{t-1}) / (L_e − i)
                w_now = self.module_map[name].weight.detach().float()
                innov = (full - (key.to(self.device) @ w_now.T)[0]) / (n_layers - i)
            g = self._gain(name, key.to(self.device))                            # G = C_t Kᵀ [d_k, 1]
            left = innov[:, None].float().contiguous()                            # Eᵀ [d_v, u]
            right = g.T.float().contiguous()                                      # Gᵀ [u, d_k]
            if not (bool(torch.isfinite(left).all()) and bool(torch.isfinite(right).all())):
                raise SingularSystemError(f"{name}: the weight change is not finite")
            overrides[name] = (left, right)
            keys[name], resids[name] = key, innov[None].float().cpu()
        # How much of z − h_init the spread update closes on the plain prompt (1 = h reaches z exactly):
        # one more forward with every layer's delta applied.
        _, h_end, _ = self._keys_and_state(self.modules[-1], key_rows, key_idx, overrides)
        gap = info["z_delta_norm"]                                               # ‖z − h_init‖ = ‖δ‖
        delivered = 1.0 - float((z - h_end).norm()) / gap if gap > 0 else 1.0
        delta = LowRankDelta({n: (l.cpu(), r.cpu()) for n, (l, r) in overrides.items()})
        norms = [delta.frobenius_norm(n) for n in self.modules]
        info.update(subject=subject.text, subject_source=subject.source, method=self.method,
                    fact_token=self.cfg.fact_token, delivered=delivered,
                    z_layer=self.z_layer, innovation=self.cfg.innovation, contexts=len(self.contexts),
                    delta_norms=norms, alpha=[self.alpha[n] for n in self.modules], beta=self.cfg.beta,
                    mom2_weight=[self.weight[n] for n in self.modules])
        return Proposal(self.modules, torch.tensor(norms, dtype=torch.float32), list(range(n_layers)), delta,
                        loss_before, len(key_rows), info, self._keys_blob(keys, resids))

    def _gain(self, name: str, key: torch.Tensor) -> torch.Tensor:
        """G [d_k, u] with ΔW_row = G E for this layer's new keys: RLSEdit's G = C_t Kᵀ (AlphaEdit overrides it)."""
        return rls_gain(self.C[name], key)[0]

    def _keys_blob(self, keys: dict[str, torch.Tensor], resids: dict[str, torch.Tensor]) -> bytes:
        tensors = {}
        for i, name in enumerate(self.modules):
            tensors[f"keys.{i}"] = keys[name].float().contiguous()
            tensors[f"innovation.{i}"] = resids[name].float().contiguous()
        return st_save(tensors, metadata={"format": KEYS_FORMAT, "modules": json.dumps(self.modules),
                                          "method": self.method})

    def keys_from_blob(self, blob: bytes, exact: bool = True) -> dict[str, torch.Tensor]:
        """{module: K [u, d_k] float32} from a proposal's state_blob; RLSStateMismatch if not an RLSEdit blob.

        exact: the blob must cover exactly this editor's modules (a fresh proposal). Otherwise (a log
        written under another layer spec) the keys of the modules both share are returned.
        """
        try:
            meta = _metadata(blob)
            tensors = st_load(blob)
        except Exception as e:  # noqa: BLE001
            raise RLSStateMismatch(f"state_blob is not an RLSEdit key blob: {e}") from e
        if meta.get("format") != KEYS_FORMAT:
            raise RLSStateMismatch(f"state_blob is not an RLSEdit key blob (format {meta.get('format')!r})")
        modules = json.loads(meta["modules"])
        if exact and modules != self.modules:
            raise RLSStateMismatch(f"state_blob was made for modules {modules}, this editor edits {self.modules}")
        keys = {n: tensors[f"keys.{i}"] for i, n in enumerate(modules) if n in self.module_map}
        for n, k in keys.items():
            if k.dim() != 2 or k.shape[1] != self.module_map[n].in_features:
                raise RLSStateMismatch(f"state_blob keys for {n} are {tuple(k.shape)}, "
                                       f"the module takes {self.module_map[n].in_features} inputs")
        return keys

    # ---- state hooks (Editor protocol) ---------------------------------------------------------------

    def _factors(self, keys: dict[str, torch.Tensor], sign: float) -> dict:
        """The Woodbury correction of every layer in ``keys`` (sign −1: new keys, +1: remove keys), each
        computed and checked (SingularSystemError), changing nothing."""
        factors = {}
        for name in self.modules:
            if name not in keys:
                continue
            k = keys[name].to(self.device)
            m = rls_gain(self.C[name], k)[1] if sign < 0 else rls_downdate_factor(self.C[name], k)
            check_correction(self.C[name], m, name)
            factors[name] = m
        return factors

    def _apply(self, factors: dict, sign: float) -> None:
        for name, m in factors.items():
            apply_correction(self.C[name], m, sign)

    def _update_all(self, keys: dict[str, torch.Tensor], sign: float) -> None:
        """Update or downdate the layers in ``keys`` atomically: every factor is checked before any C changes."""
        self._apply(self._factors(keys, sign), sign)

    def commit(self, edit_id: int, proposal: Proposal) -> None:
        """After the delta was logged and applied: C_t = C_{t-1} − F S⁻¹ Fᵀ with this edit's keys."""
        if proposal.state_blob is None:
            raise RLSStateMismatch(f"edit {edit_id}: the proposal carries no RLSEdit keys (state_blob is None)")
        self._commit_keys(edit_id, self.keys_from_blob(proposal.state_blob))

    def _commit_keys(self, edit_id: int, keys: dict[str, torch.Tensor]) -> None:
        if self.cfg.reset_every_edit:
            return  # memit-nohist: C stays C_0, history is not kept
        if edit_id in self.history:
            raise ValueError(f"edit {edit_id} is already committed to the RLS state")
        self._update_all(keys, -1.0)
        self.history[edit_id] = keys_digest(keys)

    def _logged_keys(self, edit_id: int, state_blob: bytes | None) -> dict[str, torch.Tensor]:
        """The keys edit ``edit_id`` committed, from its logged ``state_blob``, checked against the digest kept."""
        if state_blob is None:
            raise RLSStateMismatch(f"edit {edit_id}: its keys are needed to forget it, and the log has none")
        keys = self.keys_from_blob(state_blob, exact=False)
        if keys_digest(keys) != self.history[edit_id]:
            raise RLSStateMismatch(f"edit {edit_id}: the logged keys are not the ones committed")
        return keys

    def forget(self, edit_id: int, state_blob: bytes | None) -> None:
        """After a rollback: A ← A − KᵀK, so C equals never having seen the edit's keys.

        The keys come from the edit's logged ``state_blob`` (the editor keeps only their digest, so its
        memory does not grow with the number of edits). Edits this editor never committed (other
        methods, memit-nohist) leave C unchanged."""
        self.prepare_forget(edit_id, state_blob)()

    def prepare_forget(self, edit_id: int, state_blob: bytes | None) -> Callable[[], None]:
        """The downdate of ``forget``, computed and checked now, applied by the returned call.

        Raises RLSStateMismatch (the log's keys are not the committed ones) or SingularSystemError (the
        downdate is singular to working precision), changing nothing. The rollback job asks before it rolls
        the weights back, so a refused downdate leaves the edit applied; the factors are computed once, on
        the C they will be applied to (the engine's single writer changes nothing in between)."""
        if edit_id not in self.history:
            return lambda: None  # another method's edit, or memit-nohist's, whose _commit_keys records none
        factors = self._factors(self._logged_keys(edit_id, state_blob), +1.0)

        def apply() -> None:
            self._apply(factors, +1.0)
            del self.history[edit_id]
        return apply

    def restore(self, edit_id: int, state_blob: bytes | None) -> None:
        """Replay ``commit`` from a logged key blob (start-up). An edit already in a loaded snapshot is
        checked against it and skipped; a None blob (an edit of another method) is ignored.

        A blob logged under another layer spec updates the C of the layers both specs share: C_l only
        ever holds the keys of edits that wrote layer l, so that is still the exact recursion per layer.
        """
        if state_blob is None:
            return
        keys = self.keys_from_blob(state_blob, exact=False)
        if not keys:
            return  # the edit wrote none of this editor's layers
        if edit_id in self.history:
            if keys_digest(keys) != self.history[edit_id]:
                raise RLSStateMismatch(f"edit {edit_id}: the logged keys differ from the loaded state snapshot")
            return
        self._commit_keys(edit_id, keys)

    # ---- snapshots ------------------------------------------------------------------------------------

    def _signature(self) -> dict:
        """What a snapshot must agree on to be loaded into this editor."""
        return {"modules": self.modules, "method": self.method, "c_dtype": self.cfg.c_dtype,
                "fact_token": self.cfg.fact_token,
                "beta": self.cfg.beta, "alpha": [self.alpha[n] for n in self.modules],
                "mom2_weight": [self.weight[n] for n in self.modules],
                "fingerprints": [self.fingerprints[n] for n in self.modules],
                "stats_digest": [self.stats_digest[n] for n in self.modules]}

    def save_state(self, path: str | Path) -> Path:
        """Snapshot C and the committed edits' ids and key digests (safetensors; fixed size but for the ids)
        so a restart need not replay the recursion."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = self._state_tensors()
        meta = {"format": STATE_FORMAT, "signature": json.dumps(self._signature()),
                "history": json.dumps(self.history), "model": model_id(self.model)}
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, tmp, metadata=meta)
        tmp.replace(path)
        return path

    def load_state(self, path: str | Path) -> list[int]:
        """Replace C and the history by a snapshot; the ids of the edits in it. RLSStateMismatch (nothing
        changed) if it was made for other layers, statistics, model or settings."""
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT:
            raise RLSStateMismatch(f"{path} is not an RLSEdit state snapshot")
        theirs, ours = json.loads(meta["signature"]), self._signature()
        diff = sorted(k for k in ours if theirs.get(k) != ours[k])
        if diff:
            raise RLSStateMismatch(f"{path} was saved by an RLSEdit editor with different {', '.join(diff)} "
                                   f"(model {meta.get('model')!r})")
        tensors = load_file(path)
        history = {int(e): str(d) for e, d in json.loads(meta["history"]).items()}
        self._set_state_tensors(tensors)
        self.history = history
        return list(history)

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """The state a snapshot holds besides the history: C per layer ("C.<i>", [d_k, d_k])."""
        return {f"C.{i}": self.C[n].detach().cpu().contiguous() for i, n in enumerate(self.modules)}

    def _set_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.C = {n: tensors[f"C.{i}"].to(self.device, self.c_dtype).contiguous() for i, n in enumerate(self.modules)}
