"""Hierarchical-RL trainer for the HiEdit editor (arXiv 2604.11214 §4; reference notes §3-5, §8).

A training *trajectory* is a stream of N facts edited one after another into the same model;
the edits stay applied (θ_t = θ_{t-1} + ΔW_t). At step t the editor sees edit e_t, captures its
(u, δ) at θ_{t-1}, routes (p, m = top-k STE mask) and proposes ΔW_l for every module l. With
K = back_depth, μ = time_decay, α = loc_coef, λ = reg_coef, the step loss (Eq. 4) is

    L_t(m) = λ Σ_l ‖m_l ΔW_l‖² + Σ_{j<min(t,K)} μ^j [ CE(rephrase_{t-j}; θ_t)
                                                      + α KL(p(loc_{t-j}; θ_{t-1}) ‖ p(loc_{t-j}; θ_t)) ]
    θ_t = θ_{t-1} + Σ_l m_l ΔW_l

Low level (reward r^L_t = -L_t):   θ_L ← Adam(∇_θL Σ_t L_t(m))
High level (intrinsic reward Eq. 5, r^H_t = -[L_t(selected k) - sg(L_t(all L))]):
                                    θ_H ← Adam(∇_θH Σ_t (L_t(m) - sg(L_t(1))))

Both updates happen once per trajectory (``update="trajectory"``; the paper's offline update) or
after every edit (``update="per_edit"``: the MEND-style "no RL" baseline).

Gradients without dense weight gradients. For a teacher-forced loss the weight gradient of an
``nn.Linear`` is G_l = ∂L/∂W_l = Σ_s δ_s u_sᵀ (d_out × d_in), with u_s its input and δ_s the
gradient of its output at token s. Hooks give U_l [n, d_in] and D_l [n, d_out]; with
ΔW_l = left_l right_l (left [d_out, r], right [r, d_in]) the first-order surrogate is

    ⟨G_l, ΔW_l⟩_F = tr(U_lᵀ D_l left_l right_l) = Σ ((D_l left_l) ⊙ (U_l right_lᵀ))       ([n, r] products)

and ∂L/∂θ_L = Σ_l m_l ∂⟨sg(G_l), ΔW_l(θ_L)⟩/∂θ_L, ∂L/∂m_l = ⟨G_l, ΔW_l⟩ + 2λ m_l ‖ΔW_l‖².

Departures from the published code (reference §5.3-5.4, §8), all deliberate:

1. The router gets a real gradient from the task losses. The published code edits weights in
   place through ``.data``, so CE and KL have no path to the mask and the router learns only from
   the L2 term (§5.4, §8.3). Here ∂L/∂m_l = ⟨G_l, ΔW_l⟩ (option (a)/(b) of §5.4) flows through the
   STE m = onehot_topk(p) + p - sg(p) into p, for selected *and* unselected modules, so the router
   learns which modules' updates lower the rephrase CE and the locality KL. (The published behaviour,
   the router trained by the L2 term alone, was an option until the demo-bed comparison: its editors
   ended 1,000 edits at perplexity x26 against x3.3, over five seeds; git history keeps it.)
2. Low-level gradients accumulate over the whole trajectory. The MEND-style published code calls
   ``opt.zero_grad()`` at every step, so only the last step's gradient survives (§5.3 e, §8.2).
3. The L2 term reaches the low-level net as well (§8.7: in both published code bases it never does).
4. G_l is taken at the edited weights θ_t (the published code backpropagates after un-applying
   the shift, §8.8), from fp32 accumulated deltas (``WeightState``), not bf16 in-place updates.
5. The full-layer baseline L_t(all L) runs under no_grad (§7), and is skipped when k = L, where it
   equals the selected loss and the advantage is 0 exactly (RLEdit).
6. Gradients are clipped once per update, on the accumulated sum, not per step on running sums.
7. Seeds everywhere; the trajectory order is a pure function of (seed, epoch), so a resumed run
   replays the same trajectories and reaches bit-identical weights.

The advantage L_t(m) - sg(L_t(1)) has the same gradient as L_t(m) (the baseline is a constant); it
is computed and reported as the router's running reward, as in the paper.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .capture import TeacherForced, _grad_only_for, capture, thread_hooks
from .data import EditRecord
from .delta import LowRankDelta, frobenius_sq
from .hiedit import CheckpointMismatch, HiEditor
from .state import WeightState
from .tensors import logits_at
from .train_data import TrainExample, pad_examples, tokenize_records
from .train_io import TRAINER_STATE_FILE, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

UPDATE_MODES = ("trajectory", "per_edit")


class TrainConfigError(ValueError):
    """A TrainConfig field with an invalid value; the message names the field."""


# Experiment options of the demo-bed studies, removed once they had lost (docs/results.md before the real-model
# rewrite; git history keeps the code), with the value that meant "off": a checkpoint trained with them off resumes.
REMOVED_OPTIONS = {"balance_coef": 0.0, "router_reward": "task", "general_loc": 0, "general_max_tokens": 32}


@dataclass
class TrainConfig:
    """Options of the hierarchical-RL trainer.

    Defaults are sized for the few-million-parameter demo models of this repository. The paper's
    8B-model values are lr_init 1e-6, meta_lr 1e-5, rank 1920, router_hidden 256. With
    ``lr_init=None`` the initial edit lr η_0 is calibrated on the model itself (``calibrate_eta``),
    so the same defaults work for a 2M-parameter demo model and for an 8B one.
    """

    # schedule
    epochs: int = 3                   # passes over the training records
    trajectories: int | None = None   # trajectories per epoch; None = as many full ones as the records allow
    traj_len: int = 30                # N: facts edited one after another per trajectory (their edits stay applied)
    update: str = "trajectory"        # when the nets learn: "trajectory" (once per trajectory: HiEdit, RLEdit)
                                      # | "per_edit" (after every edit, no RL: the MEND baseline)
    stop_after: int | None = None     # stop this call after that many trajectories (continue with resume)
    # loss (Eq. 4)
    back_depth: int = 10              # K: how many recent edits (this one included) each step scores
    time_decay: float = 0.95          # μ: the j-th most recent edit is weighted μ^j
    loc_coef: float = 1.0             # α: weight of the locality KL next to the rephrase CE
    reg_coef: float = 1e-4            # λ: weight of ‖m_l ΔW_l‖² (the L2 term)
    edit_coef: float = 1.0            # weight of CE(edit prompt) next to CE(rephrase); 0 = the paper's rephrase only
    baseline: bool = True             # compute L(all modules) for the router's advantage (skipped when k = L)
    # optimisation
    meta_lr: float = 3e-4             # Adam lr of the low-level nets (offsets o_l; blocks unless block_lr says)
    block_lr: float | None = 0.0      # Adam lr of the blocks' A, B, b, s (None = meta_lr; 0 = kept at identity)
    router_lr: float | None = None    # Adam lr of the router (None = meta_lr)
    eta_lr: float | None = None       # Adam lr of the learned edit lrs η_l (None = eta_lr_rel · η_0)
    eta_lr_rel: float = 0.2           # η_l moves by about this fraction of η_0 per update
    max_grad_norm: float = 1.0        # each level's accumulated gradient is clipped to this norm per update
    update_norms: bool = True         # fold each capture into the running normalisers (the paper: always)
    norm_warmup: int = 64             # facts captured at θ_0 to initialise the normalisers before training
    # editor construction (used only when the trainer creates the editor)
    lr_init: float | None = None      # initial η_l; None = calibrate η_0 on the model (calibrate_eta)
    calib_facts: int = 16             # facts the calibration of η_0 edits one at a time
    rank: int = 256                   # r of each low-level block
    n_blocks: int = 2                 # low-level blocks per net
    router_hidden: int = 256          # width of the router's encoder
    tokens: str = "all"               # capture positions: "all" (MEND style) | "target"
    max_delta_rel: float = 0.0        # trust region ρ of every edit: ‖ΔW_l‖_F ≤ ρ ‖W_l⁰‖_F (0 = none)
    method: str | None = None         # name saved with the editor; None = hiedit / rledit (k = L) / mend
    # data
    skip_bad: bool = False            # skip records the tokenizer cannot encode instead of failing
    save_every: int = 1               # checkpoint every this many trajectories (and at the end)

    # fields that may change when a run is resumed; every other one must match the checkpoint
    RESUMABLE = ("epochs", "stop_after", "save_every", "skip_bad", "baseline")

    def validate(self) -> None:
        def bad(name: str, rule: str):
            raise TrainConfigError(f"{name}: {rule} (got {getattr(self, name)!r})")

        if not isinstance(self.norm_warmup, int) or self.norm_warmup < 0:
            bad("norm_warmup", "must be an integer >= 0")
        for name in ("epochs", "traj_len", "back_depth", "rank", "n_blocks", "router_hidden", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be an integer >= 1")
        if not math.isfinite(self.max_delta_rel) or self.max_delta_rel < 0:
            bad("max_delta_rel", "must be a finite number >= 0 (0 = no trust region)")
        for name in ("trajectories", "stop_after"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(name, "must be None or an integer >= 1")
        if self.update not in UPDATE_MODES:
            bad("update", f"must be one of {UPDATE_MODES}")
        if self.tokens not in ("all", "target"):
            bad("tokens", "must be 'all' or 'target'")
        if not 0 < self.time_decay <= 1:
            bad("time_decay", "must be in (0, 1]")
        for name in ("loc_coef", "reg_coef", "edit_coef"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "must be a finite number >= 0")
        for name in ("meta_lr", "max_grad_norm", "eta_lr_rel"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                bad(name, "must be a finite number > 0")
        if self.lr_init is not None and not (math.isfinite(self.lr_init) and self.lr_init > 0):
            bad("lr_init", "must be None (calibrate) or a finite number > 0")
        if not isinstance(self.calib_facts, int) or self.calib_facts < 1:
            bad("calib_facts", "must be an integer >= 1")
        if self.block_lr is not None and not (math.isfinite(self.block_lr) and self.block_lr >= 0):
            bad("block_lr", "must be None (= meta_lr) or a finite number >= 0 (0 = blocks kept at identity)")
        for name in ("eta_lr", "router_lr"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                bad(name, "must be None or a finite number > 0")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def check_resume(self, state: dict, seed: int, where: Path) -> None:
        """TrainConfigError unless a run checkpointed with ``state`` (its seed and options) may continue under
        this config and ``seed``: only the RESUMABLE fields may change."""
        if state["seed"] != seed:
            raise TrainConfigError(f"seed: the checkpoint in {where} was trained with seed {state['seed']}, not {seed}")
        for name, value in state["cfg"].items():
            if not hasattr(self, name):  # an experiment option since removed: resumable only if it was off
                if REMOVED_OPTIONS.get(name, object()) != value:
                    raise TrainConfigError(f"{name}: the checkpoint in {where} was trained with {value!r}, an option "
                                           "this version no longer has (git history keeps it)")
                continue
            if name not in self.RESUMABLE and getattr(self, name) != value:
                raise TrainConfigError(f"{name}: the checkpoint in {where} was trained with {value!r}, "
                                       f"not {getattr(self, name)!r}; only {', '.join(self.RESUMABLE)} may change")


@dataclass
class StepStats:
    """What one edit step of a trajectory measured (all plain floats, for logs and tests).

    ce:       CE of the current edit's rephrase at θ_t (after its edit)
    ce_before: teacher-forced loss of the edit prompt at θ_{t-1} (what the capture saw)
    task:     Σ_j μ^j [CE_j + α KL_j] with the selected layers
    kl:       mean locality KL over the window
    reg:      λ Σ_l ‖m_l ΔW_l‖²
    advantage: L(selected) - L(all layers); 0 when k = L or the baseline is off
    selected: module indices the router chose
    """

    ce: float
    ce_before: float
    task: float
    kl: float
    reg: float
    advantage: float
    selected: list[int] = field(default_factory=list)


BLOCK_PARAMS = (".A", ".B", ".bias", ".scale.weight")  # an EditorBlock's own map; its offset o_l is apart


class Trainer:
    """Runs trajectories for one HiEditor and accumulates the gradients of both levels.

    The public pieces are small on purpose so tests can look at gradients between steps:
    ``begin_trajectory()``, ``edit_step(i)`` (accumulates), ``optimizer_step()``, ``zero_grad()``.
    """

    def __init__(self, editor: HiEditor, examples: list[TrainExample], cfg: TrainConfig, k: int):
        cfg.validate()
        self.editor, self.examples, self.cfg, self.k = editor, examples, cfg, k
        self.model = editor.model
        self.net = editor.net
        self.modules = editor.modules
        self.module_map = editor.module_map
        self.L = len(self.modules)
        self.device = next(self.model.parameters()).device
        self.pad_id = editor.tokenizer.pad_token_id if editor.tokenizer.pad_token_id is not None else 0
        self.state = WeightState(self.module_map, "train")
        self.window: deque[int] = deque(maxlen=cfg.back_depth)
        self.t = 0
        # Two optimisers, as the published code (opt for the low level, hi_opt for the router);
        # the learned edit lrs η_l get their own Adam lr (MEND's lr_lr).
        named = list(self.net.nets.named_parameters())
        eta = [p for n, p in named if n.endswith("lr.weight")]
        blocks = [p for n, p in named if n.endswith(BLOCK_PARAMS)]
        offsets = [p for n, p in named if not n.endswith(("lr.weight",) + BLOCK_PARAMS)]
        # Departure from the published recipe (blocks learn at the meta lr): on the demo model,
        # editors whose blocks learn (block_lr 1e-5 .. 3e-4, with or without general-text locality and
        # a trust region) collapse the model within 100-300 sequential edits (dev stream of 100 held-out
        # facts, block_lr 1e-5: perplexity 1,824 -> 200,913, known-fact top-1 100% -> 4%), while with
        # the blocks at identity the same stream ends at perplexity 2,409 and 29%. The net is then
        # ΔW_l = -η_l (δ̂ + o)ᵀ(û + o): MEND's normalised gradient with learned per-module offsets and
        # edit lrs. Frozen blocks take no gradient at all, so they leave the clipping of the rest alone.
        self._frozen = blocks if cfg.block_lr == 0 else []
        for p in self._frozen:
            p.requires_grad_(False)
        self.low_params = offsets + eta + ([] if self._frozen else blocks)
        self.router_params = list(self.net.router.parameters())
        eta0 = float(eta[0].detach().abs().mean()) if eta else 0.0
        groups = [{"params": offsets, "lr": cfg.meta_lr},
                  {"params": eta, "lr": cfg.eta_lr or cfg.eta_lr_rel * eta0 or cfg.meta_lr}]
        if not self._frozen:
            groups.append({"params": blocks, "lr": cfg.meta_lr if cfg.block_lr is None else cfg.block_lr})
        self.opt_low = torch.optim.Adam(groups)
        self.opt_router = torch.optim.Adam(self.router_params, lr=cfg.router_lr or cfg.meta_lr)
        self.zero_grad()

    # ---- bookkeeping ------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        for p in self.net.parameters():
            p.grad = None

    def begin_trajectory(self) -> None:
        """Back to θ_0 (the base weights, byte for byte) with an empty replay window."""
        self.state.reset()
        self.window.clear()
        self.t = 0

    def end(self) -> None:
        self.state.reset()
        for p in self._frozen:
            p.requires_grad_(True)

    @torch.no_grad()
    def warm_up_norms(self, indices: Sequence[int]) -> None:
        """Fold the (u, δ) of these facts at θ_0 into both normalisers before any edit is made.

        Without it the first edits of the first trajectory are scaled by statistics of a handful
        of tokens (or by none: an empty RunningNorm is the identity, and raw δ are ~1e-3).
        """
        self.state.reset()
        for i in indices:
            cap = capture(self.model, self.module_map, self.examples[int(i)].edit, self.cfg.tokens)
            self.net.update_norms([cap.keys[n] for n in self.modules], [cap.grads[n] for n in self.modules])

    @torch.no_grad()
    def calibrate_eta(self, indices: Sequence[int], grid: Sequence[float] | None = None) -> float:
        """Pick the initial edit lr η_0 (same for every module) from a log grid, on the model itself.

        For each fact of ``indices`` alone (at θ_0): route with the untrained router, build the top-k
        ΔW_l at η = 1 (ΔW is linear in η: left = -η Δ̃ᵀ), then score η·ΔW on the one-edit loss
        CE(rephrase) + α KL(loc). η_0 = the grid value with the lowest mean loss. The paper's 1e-6
        was tuned by hand for 8B models; a model a thousand times smaller needs a far larger step,
        and this finds it in a few hundred forward passes. Sets η_l = η_0 and the η Adam lr.
        """
        grid = list(grid or [10 ** (e / 2) for e in range(-14, 1)])   # 1e-7 .. 1
        eta_params = [net.lr.weight for net in self.net.nets.values()]
        saved = [w.detach().clone() for w in eta_params]
        for w in eta_params:
            w.fill_(1.0)
        cases = []
        self.state.reset()
        for i in indices:
            ex = self.examples[int(i)]
            cap = capture(self.model, self.module_map, ex.edit, self.cfg.tokens)
            p, _ = self.editor.route(cap, self.k)
            sel = p.topk(self.k).indices.tolist()
            f = self.net.factors_many(sel, [cap.keys[n] for n in self.modules], [cap.grads[n] for n in self.modules],
                                      trust_region=False)  # applied below, after η scales ΔW
            locs = [ex.loc] if ex.loc is not None else []
            ref = self._ref_logprobs(locs)
            batch = pad_examples([ex.rephrase] + locs, self.pad_id, self.device)
            cases.append((f, ref, batch, len(locs)))
        for w, v in zip(eta_params, saved):
            w.copy_(v)
        losses = []
        for eta in grid:
            total = 0.0
            for f, ref, (ids, mask, labels), n_loc in cases:
                delta = LowRankDelta({self.modules[l]: self.net.within_trust_region(l, eta * left, right)
                                      for l, (left, right) in f.items()})
                self.state.apply(0, delta)
                weights = torch.ones(1 + n_loc, device=self.device)
                logits = logits_at(self.model, ids, mask, labels != -100)
                total += float(self._task_loss(logits, labels, 1, weights, ref)[0])
                self.state.reset()
            losses.append(total / max(len(cases), 1))
        finite = [(loss, eta) for loss, eta in zip(losses, grid) if math.isfinite(loss)]
        eta0 = min(finite)[1] if finite else grid[0]
        log.info("calibrated η_0 = %.3g (one-edit loss %s)", eta0,
                 ", ".join(f"{e:.0e}:{l:.3f}" for e, l in zip(grid, losses)))
        for w in eta_params:
            w.fill_(eta0)
        self.editor.cfg.lr_init = eta0
        self.opt_low.param_groups[1]["lr"] = self.cfg.eta_lr or self.cfg.eta_lr_rel * eta0
        return eta0

    def optimizer_step(self) -> tuple[float, float]:
        """Clip the accumulated gradients, take one Adam step per level, zero them; (low, router) norms."""
        low = float(nn.utils.clip_grad_norm_(self.low_params, self.cfg.max_grad_norm))
        hi = float(nn.utils.clip_grad_norm_(self.router_params, self.cfg.max_grad_norm))
        self.opt_low.step()
        self.opt_router.step()
        self.zero_grad()
        return low, hi

    # ---- losses -------------------------------------------------------------------------------------

    @torch.no_grad()
    def _ref_logprobs(self, locs: list[TeacherForced]) -> torch.Tensor | None:
        """log p(· | loc, θ_{t-1}) at the locality target positions: [n_pos, V] (None if no loc)."""
        if not locs:
            return None
        ids, mask, labels = pad_examples(locs, self.pad_id, self.device)
        return logits_at(self.model, ids, mask, labels != -100).log_softmax(-1)

    def _task_loss(self, logits: torch.Tensor, labels: torch.Tensor, n_reph: int, weights: torch.Tensor,
                   ref: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Σ_j μ^j [CE_j + α KL_j] for a batch of n_reph rephrase rows then the loc rows.

        logits: [P, V] at the positions labels != -100 of labels [B, T], row-major (``tensors.logits_at``).
        Returns (task loss, per-rephrase CE [n_reph], per-loc KL [n_loc]).
        CE_j: mean over the rephrase's target tokens. KL_j: Σ_v p_ref (log p_ref - log p) averaged
        over the loc target positions (F.kl_div batchmean per example, as the published util.py).
        """
        sel = labels != -100
        owner = sel.nonzero()[:, 0]                                 # batch row of each kept position
        counts = sel.sum(1).to(logits.dtype)                        # [B]
        logp = logits.log_softmax(-1)
        is_reph = owner < n_reph
        nll = -logp[is_reph].gather(-1, labels[sel][is_reph].unsqueeze(-1)).squeeze(-1)
        ce = torch.zeros(n_reph, device=logits.device).index_add(0, owner[is_reph], nll) / counts[:n_reph]
        task = (weights[:n_reph] * ce).sum()
        kl = logits.new_zeros(0)
        n_loc = labels.shape[0] - n_reph
        if ref is not None and n_loc > 0:
            post = logp[~is_reph]                                   # [n_pos, V], same order as ref
            per_pos = (ref.exp() * (ref - post)).sum(-1)            # KL(p_ref ‖ p_post) at each position
            kl = torch.zeros(n_loc, device=logits.device).index_add(0, owner[~is_reph] - n_reph, per_pos)
            kl = kl / counts[n_reph:]
            task = task + self.cfg.loc_coef * (weights[n_reph:] * kl).sum()
        return task, ce, kl

    # ---- one edit step --------------------------------------------------------------------------------

    def edit_step(self, index: int) -> StepStats:
        """Edit fact ``index`` into the current model, accumulate both levels' gradients, keep the edit."""
        cfg, ex = self.cfg, self.examples[index]
        # 1. (u, δ) of the edit prompt at θ_{t-1}; normalisers see them (training time only).
        cap = capture(self.model, self.module_map, ex.edit, cfg.tokens)
        keys = [cap.keys[n] for n in self.modules]
        grads = [cap.grads[n] for n in self.modules]
        if cfg.update_norms:
            self.net.update_norms(keys, grads)
        # 2. route (p [L], m [L] with the STE) and propose ΔW_l for every module, differentiably.
        with torch.enable_grad():
            p, m = self.editor.route(cap, self.k)
            factors = self.net.factors_many(list(range(self.L)), keys, grads)  # all L: the baseline needs them
        selected = [l for l in range(self.L) if float(m[l].detach()) > 0.5]

        # 3. the replay window: edit t and the K-1 before it, weighted μ^j (j = 0 is the newest).
        self.window.append(index)
        recent = list(reversed(self.window))
        reph = [self.examples[i].rephrase for i in recent]
        if cfg.edit_coef > 0:
            # Departure from the paper (which scores only the rephrase): the edit prompt itself is
            # scored too. A few-million-parameter model generalises little from a prompt to its
            # paraphrase, and on rephrases alone the editor learns edits that do not even change
            # the prompt's own answer (demo model: 24% single-edit efficacy with edit_coef = 0).
            reph = reph + [self.examples[i].edit for i in recent]
        loc_pairs = [(j, self.examples[i].loc) for j, i in enumerate(recent) if self.examples[i].loc is not None]
        locs = [tf for _, tf in loc_pairs]
        decay = [cfg.time_decay ** j for j in range(len(recent))]
        ce_weights = decay + ([cfg.edit_coef * d for d in decay] if cfg.edit_coef > 0 else [])
        weights = torch.tensor(ce_weights + [decay[j] for j, _ in loc_pairs], device=self.device)
        ref = self._ref_logprobs(locs)                              # at θ_{t-1}, before the edit

        # 4. θ_t = θ_{t-1} + Σ_{l selected} ΔW_l (fp32 accumulators; stays applied).
        sel_delta = LowRankDelta({self.modules[l]: (factors[l][0].detach(), factors[l][1].detach())
                                  for l in selected})
        self.state.apply(self.t, sel_delta)

        # 5. task loss at θ_t and the per-token (u, δ) of every module: G_l = D_lᵀ U_l, never dense.
        ids, mask, labels = pad_examples(reph + locs, self.pad_id, self.device)
        U, D, outs = {}, {}, {}

        def hook(name):
            def fn(_mod, args, out):
                U[name] = args[0]
                outs[name] = out
            return fn

        with thread_hooks([(self.module_map[n], hook(n)) for n in self.modules]), \
                _grad_only_for([mod.weight for mod in self.module_map.values()]), torch.enable_grad():
            logits = logits_at(self.model, ids, mask, labels != -100)
            task, ce, kl = self._task_loss(logits, labels, len(reph), weights, ref)
            out_grads = torch.autograd.grad(task, [outs[n] for n in self.modules])
        real = mask.bool()
        for n, g in zip(self.modules, out_grads):
            U[n] = U[n].detach()[real].float()                     # [n_tok, d_in]
            D[n] = g[real].float()                                 # [n_tok, d_out]
        outs.clear()                                               # free the graph's activations

        # 6. full-layer baseline L(all L) under no_grad: add the unselected modules' ΔW for one pass.
        full = float("nan")
        others = [l for l in range(self.L) if l not in selected]
        if not others:
            full = float(task.detach())                            # k = L: selected == all, advantage 0
        elif cfg.baseline:
            # A temporary pointer swap, restored to the very same tensors after: O(1) instead of a
            # WeightState rollback, which re-adds every delta of the trajectory (O(t) per step).
            served = {l: self.module_map[self.modules[l]].weight.data for l in others}
            try:
                with torch.no_grad():
                    for l in others:
                        w = served[l]
                        left, right = factors[l]
                        self.module_map[self.modules[l]].weight.data = \
                            torch.addmm(w.float(), left.detach(), right.detach()).to(w.dtype)
                    full = float(self._task_loss(logits_at(self.model, ids, mask, labels != -100), labels, len(reph),
                                                 weights, ref)[0])
            finally:
                for l in others:
                    self.module_map[self.modules[l]].weight.data = served[l]

        # 7. surrogate whose gradient is the true first-order gradient of L_t(m) for both levels:
        #    S = Σ_l m_l ⟨sg(G_l), ΔW_l(θ_L)⟩ + λ m_l² ‖ΔW_l(θ_L)‖²
        #    ∂S/∂θ_L = Σ_l m_l [⟨G_l, ∂ΔW_l⟩ + λ ∂‖ΔW_l‖²]     (only selected modules: m_l = 0 otherwise)
        #    ∂S/∂m_l = ⟨G_l, ΔW_l⟩ + 2λ m_l ‖ΔW_l‖²           -> through the STE into p and the router
        #    Departure from the published code: there CE/KL never reach the mask (reference §5.4).
        with torch.enable_grad():
            surrogate = p.new_zeros(())
            reg = p.new_zeros(())
            for l, name in enumerate(self.modules):
                left, right = factors[l]
                inner = ((D[name] @ left) * (U[name] @ right.T)).sum()    # ⟨G_l, ΔW_l⟩ via [n, r] products
                sq = frobenius_sq(left, right)
                reg = reg + cfg.reg_coef * m[l] ** 2 * sq
                surrogate = surrogate + m[l] * inner
            surrogate = surrogate + reg
            # Gradients accumulate into .grad over the whole trajectory (no zero_grad here).
            surrogate.backward()

        self.t += 1
        if cfg.update == "per_edit":
            self.optimizer_step()
        loss_sel = float(task.detach()) + float(reg.detach())
        return StepStats(ce=float(ce[0].detach()), ce_before=cap.loss, task=float(task.detach()),
                         kl=float(kl.detach().mean()) if kl.numel() else 0.0, reg=float(reg.detach()),
                         advantage=loss_sel - full if math.isfinite(full) else float("nan"), selected=selected)

    def run_trajectory(self, indices: Sequence[int], step: bool = True, bar=None) -> list[StepStats]:
        """Edit ``indices`` one after another from θ_0; one optimiser step at the end (trajectory mode)."""
        self.begin_trajectory()
        stats = []
        try:
            for i in indices:
                stats.append(self.edit_step(int(i)))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(_postfix(stats), refresh=False)
        finally:
            self.state.reset()
        if step and self.cfg.update == "trajectory":
            self.optimizer_step()
        return stats


def _postfix(stats: list[StepStats], last: int = 50) -> dict[str, str]:
    s = stats[-last:]
    adv = [x.advantage for x in s if math.isfinite(x.advantage)]
    return {"ce": f"{sum(x.ce for x in s) / len(s):.3f}", "kl": f"{sum(x.kl for x in s) / len(s):.4f}",
            "reg": f"{sum(x.reg for x in s) / len(s):.2e}",
            "adv": f"{sum(adv) / len(adv):+.4f}" if adv else "n/a"}


def trajectory_order(n_records: int, traj_len: int, n_traj: int, seed: int, epoch: int) -> list[list[int]]:
    """Record indices of every trajectory of ``epoch``: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_records, generator=g).tolist()
    return [perm[i * traj_len:(i + 1) * traj_len] for i in range(n_traj)]


def _default_method(cfg: TrainConfig, k: int, n_modules: int) -> str:
    if cfg.method:
        return cfg.method
    if cfg.update == "per_edit":
        return "mend"
    return "rledit" if k == n_modules else "hiedit"


def train_editor(model: nn.Module, tokenizer, layer_spec: str, k: int, records: list[EditRecord],
                 out_dir: Path | None, seed: int = 0, cfg: TrainConfig | None = None, progress: bool = True,
                 resume: bool = False, editor: HiEditor | None = None) -> HiEditor:
    """Train a HiEdit editor for ``model`` on ``records`` by hierarchical RL; returns it (eval mode).

    layer_spec/k: the editable modules and how many each edit changes (k = L gives RLEdit).
    out_dir: where the editor (config.json + editor.safetensors, loadable by HiEditor.load) and
        ``trainer_state.pt`` (optimiser state, progress) are written after every trajectory;
        None trains in memory only. With ``resume`` a run found there continues where it stopped
        (a checkpoint for another model, layer spec or k is refused with CheckpointMismatch).
    editor: train this editor instead of creating one (ignored when resuming from out_dir).

    The model is put in eval mode with its parameters frozen; its weights are back to the base
    values, byte for byte, when this returns.
    """
    cfg = cfg or TrainConfig()
    cfg.validate()
    torch.manual_seed(seed)
    model.eval()
    model.requires_grad_(False)
    out_dir = Path(out_dir) if out_dir is not None else None
    state, created = None, False
    if resume and out_dir is not None and (out_dir / TRAINER_STATE_FILE).is_file():
        editor, state = load_checkpoint(out_dir, model, tokenizer, layer_spec, k)
        cfg.check_resume(state, seed, out_dir)
        editor.net.load_state_dict(state["net"])  # bit-exact with the optimiser state below
        log.info("resuming %s at epoch %d, trajectory %d", out_dir, state["epoch"], state["traj"])
    elif editor is None:
        editor = HiEditor.create(model, tokenizer, layer_spec, k=k, seed=seed, lr_init=cfg.lr_init or 1e-6,
                                 rank=cfg.rank, n_blocks=cfg.n_blocks, router_hidden=cfg.router_hidden,
                                 tokens=cfg.tokens, max_delta_rel=cfg.max_delta_rel)
        created = True
    else:
        if editor.cfg.layer_spec.replace(" ", "") != layer_spec.replace(" ", ""):
            raise CheckpointMismatch(f"the editor given was built for layers {editor.cfg.layer_spec!r}, "
                                     f"not {layer_spec!r}")
    if not 1 <= k <= len(editor.modules):
        raise TrainConfigError(f"k: {k} is out of range, the layer spec has {len(editor.modules)} modules")
    editor.cfg.k = k
    editor.cfg.method = editor.method = _default_method(cfg, k, len(editor.modules))

    examples, skipped = tokenize_records(tokenizer, records, editor.cfg.max_prompt_tokens,
                                         editor.cfg.max_target_tokens, cfg.skip_bad)
    if skipped:
        log.warning("skipped %d of %d records the tokenizer cannot encode or that exceed the editor's "
                    "max_prompt_tokens / max_target_tokens", skipped, len(records))
    n_traj = cfg.trajectories or len(examples) // cfg.traj_len
    if n_traj < 1 or n_traj * cfg.traj_len > len(examples):
        raise TrainConfigError(f"trajectories: {n_traj} trajectories of traj_len {cfg.traj_len} need "
                               f"{max(n_traj, 1) * cfg.traj_len} records, only {len(examples)} are usable")

    editor.net.train()
    trainer = Trainer(editor, examples, cfg, k)
    epoch0, traj0, history = 0, 0, []
    if state is not None:
        trainer.opt_low.load_state_dict(state["opt_low"])
        trainer.opt_router.load_state_dict(state["opt_router"])
        epoch0, traj0, history = state["epoch"], state["traj"], state["history"]
        if state["n_examples"] != len(examples):
            raise TrainConfigError(f"records: the checkpoint in {out_dir} was trained on {state['n_examples']} "
                                   f"usable records, this run has {len(examples)}: resume with the same data")

    def save(epoch: int, traj: int) -> None:
        if out_dir is None:
            return
        save_checkpoint(
            out_dir, editor,
            {"epoch": epoch, "traj": traj, "seed": seed, "cfg": cfg.as_dict(), "layer_spec": layer_spec, "k": k,
             "n_examples": len(examples),
             "net": {n: t.detach().cpu().clone() for n, t in editor.net.state_dict().items()},
             "opt_low": trainer.opt_low.state_dict(), "opt_router": trainer.opt_router.state_dict(),
             "history": history},
            {"seed": seed, "layer_spec": layer_spec, "k": k, "method": editor.method, "cfg": cfg.as_dict(),
             "records": len(examples), "skipped": skipped, "trajectories_per_epoch": n_traj,
             "epoch": epoch, "traj": traj, "done": epoch >= cfg.epochs, "history": history})

    if state is None and cfg.norm_warmup and cfg.update_norms:
        g = torch.Generator().manual_seed(seed * 1_000_003 - 1)
        trainer.warm_up_norms(torch.randperm(len(examples), generator=g)[:cfg.norm_warmup].tolist())
    if created and cfg.lr_init is None:  # an editor passed in keeps the η it was built with
        g = torch.Generator().manual_seed(seed * 1_000_003 - 2)
        trainer.calibrate_eta(torch.randperm(len(examples), generator=g)[:cfg.calib_facts].tolist())
    total = cfg.epochs * n_traj * cfg.traj_len
    done = (epoch0 * n_traj + traj0) * cfg.traj_len
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=done, desc=f"train {editor.method} k={k}", unit="edit", dynamic_ncols=True)
    # Trajectories are numbered pos = epoch * n_traj + traj; the order of each epoch is a pure
    # function of (seed, epoch), so a resumed run replays exactly the trajectories left.
    pos, ran, orders = epoch0 * n_traj + traj0, 0, {}
    try:
        while pos < cfg.epochs * n_traj and (cfg.stop_after is None or ran < cfg.stop_after):
            epoch, traj = divmod(pos, n_traj)
            if epoch not in orders:
                orders = {epoch: trajectory_order(len(examples), cfg.traj_len, n_traj, seed, epoch)}
            stats = trainer.run_trajectory(orders[epoch][traj], bar=bar)
            history.append({"epoch": epoch, "traj": traj, **_postfix(stats, last=len(stats))})
            pos, ran = pos + 1, ran + 1
            if ran % cfg.save_every == 0:
                save(*divmod(pos, n_traj))
    finally:
        trainer.end()
        if bar is not None:
            bar.close()
    save(*divmod(pos, n_traj))
    editor.net.eval()
    return editor
