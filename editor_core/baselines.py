"""Baseline editors for the benchmark, and the registry of every method ``hiedit eval`` runs.

Every method is an ``Editor`` (propose / commit / forget / restore) whose proposals go through
``WeightState`` like HiEdit's, so the harness treats them uniformly:

    pre          no edit (an empty delta): the unedited model's scores
    hiedit       the trained HiEdit editor, k = L/2 modules per fact
    rledit       the same training with k = L (every module), run with k = L
    mend         the same low-level nets trained without RL: parameters updated after every
                 edit (train_editor(update="per_edit")), run on every module (k = L)
    ft           a few Adam steps on the edit loss over the same modules as HiEdit, under a
                 Frobenius norm bound; the change is returned as a *dense* ΔW = U S Vᵀ
                 (truncated SVD, its numerical rank), acceptable for a baseline
    random-k     HiEdit's own low-level nets, but the k modules drawn at random (Table 5)
    gradnorm-k   HiEdit's low-level nets, the k modules with the largest ‖Σ_t δ_t u_tᵀ‖_F
    rlsedit      RLSEdit (editor_core.rlsedit)
    memit-nohist RLSEdit with its history reset after every edit (MEMIT without memory)
    alphaedit    AlphaEdit (editor_core.alphaedit): MEMIT's keys and values on RLSEdit's layers, the
                 update projected onto the null space of the preserved keys
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .alphaedit import AlphaEditor, AlphaEditParams
from .capture import Capture, target_loss, teacher_forced
from .data import EditRecord
from .delta import LowRankDelta
from .editor import EditRequest, Editor, Proposal, StatelessEditor
from .hiedit import CheckpointMismatch, HiEditor, base_weights_fingerprint
from .rlsedit import RLSEditConfig, RLSEditor
from .train import TrainConfig, train_editor
from .train_io import TRAIN_LOG_FILE


# ---------------------------------------------------------------------------------------------
# pre: no edit
# ---------------------------------------------------------------------------------------------

class NoEdit(StatelessEditor):
    """Proposes nothing: the benchmark's "pre" row (the unedited model)."""

    method = "pre"

    def __init__(self):
        self.modules: list[str] = []

    def propose(self, request: EditRequest, k: int | None = None) -> Proposal:
        return Proposal([], torch.zeros(0), [], LowRankDelta(), float("nan"), 0)


# ---------------------------------------------------------------------------------------------
# random-k / gradnorm-k: HiEdit's low-level nets behind another router
# ---------------------------------------------------------------------------------------------

def gradient_norms(cap: Capture, modules: list[str]) -> torch.Tensor:
    """[L] ‖Σ_t δ_t u_tᵀ‖_F per module, from the factors: ‖Δᵀ U‖_F² = Σ (U Uᵀ) ⊙ (Δ Δᵀ).

    U = keys [n, d_in], Δ = grads [n, d_out]; only n × n Gram matrices are formed.
    """
    out = []
    for name in modules:
        u, d = cap.keys[name].double(), cap.grads[name].double()
        out.append(((u @ u.T) * (d @ d.T)).sum().clamp_min(0).sqrt())
    return torch.stack(out).float()


class RoutedEditor(StatelessEditor):
    """HiEdit's low-level nets with the router replaced (reference Table 5 ablations).

    router: "random" (k modules drawn uniformly, seeded by (seed, prompt, target) so a
    proposal does not depend on what was edited before) or "gradnorm" (largest gradient norm).
    """

    def __init__(self, inner: HiEditor, router: str, k: int | None = None, seed: int = 0):
        if router not in ("random", "gradnorm"):
            raise ValueError(f"router must be 'random' or 'gradnorm', not {router!r}")
        self.inner = inner
        self.router = router
        self.method = f"{router}-k"
        self.modules = inner.modules
        self.k = k or inner.cfg.k
        self.seed = seed

    def scores(self, request: EditRequest, cap: Capture) -> torch.Tensor:
        if self.router == "gradnorm":
            return gradient_norms(cap, self.modules)
        digest = hashlib.sha256(f"{self.seed}\0{request.prompt}\0{request.target}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.rand(len(self.modules), generator=gen)

    @torch.no_grad()
    def propose(self, request: EditRequest, k: int | None = None) -> Proposal:
        k = k or self.k
        if not 1 <= k <= len(self.modules):
            raise ValueError(f"k={k} is out of range: choose 1..{len(self.modules)}")
        cap = self.inner.capture(request.prompt, request.target)
        p = self.scores(request, cap)
        selected = sorted(p.topk(k).indices.tolist())
        return Proposal(self.modules, p.float().cpu(), selected, self.inner.delta_for(cap, selected), cap.loss,
                        cap.n_tokens, info={"router": self.router})


# ---------------------------------------------------------------------------------------------
# ft: constrained fine-tuning of the same modules
# ---------------------------------------------------------------------------------------------

@dataclass
class FTConfig:
    """Fine-tuning baseline (FT-L in the MEND/ROME papers, with a Frobenius instead of an L∞ bound)."""

    steps: int = 10
    lr: float = 5e-3              # Adam step size
    norm_bound: float = 0.05      # ‖ΔW_l‖_F ≤ norm_bound · ‖W_l‖_F, by projection after each step
    stop_loss: float = 0.05       # stop early once the edit loss is this low
    svd_rtol: float = 1e-5        # singular values below rtol · σ_max are dropped from the delta


class FineTuneEditor(StatelessEditor):
    """Adam on the edit loss over all modules of a layer spec, starting from the current weights.

    The model is never changed: the trial weights W + ΔW are passed to ``torch.func.functional_call``.
    The result is the dense change ΔW_l, returned as factors (U_r S_r, V_rᵀ) of its truncated SVD.
    """

    method = "ft"

    def __init__(self, model: nn.Module, tokenizer, module_map: dict[str, nn.Linear], cfg: FTConfig | None = None,
                 seed: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.module_map = dict(module_map)
        self.modules = list(self.module_map)
        self.cfg = cfg or FTConfig()
        self.seed = seed

    def propose(self, request: EditRequest, k: int | None = None) -> Proposal:
        cfg = self.cfg
        example = teacher_forced(self.tokenizer, request.prompt, request.target)
        device = next(self.model.parameters()).device
        ids, labels = example.input_ids.to(device), example.labels.to(device)
        weights = {n: m.weight.detach() for n, m in self.module_map.items()}
        bounds = {n: cfg.norm_bound * float(w.float().norm()) for n, w in weights.items()}
        deltas = {n: torch.zeros(w.shape, dtype=torch.float32, device=device, requires_grad=True)
                  for n, w in weights.items()}
        opt = torch.optim.Adam(list(deltas.values()), lr=cfg.lr)
        loss_before = None
        torch.manual_seed(self.seed)
        with torch.enable_grad():
            for _ in range(cfg.steps):
                params = {f"{n}.weight": (weights[n].float() + deltas[n]).to(weights[n].dtype) for n in weights}
                logits = torch.func.functional_call(self.model, params, args=(), kwargs={"input_ids": ids}).logits
                loss = target_loss(logits, labels)
                if loss_before is None:
                    loss_before = float(loss.detach())
                if float(loss.detach()) < cfg.stop_loss:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():  # project each module's change back into its norm ball
                    for n, d in deltas.items():
                        norm = float(d.norm())
                        if norm > bounds[n] > 0:
                            d.mul_(bounds[n] / norm)
        factors, importances, selected = {}, [], []
        for i, (n, d) in enumerate(deltas.items()):
            d = d.detach()
            importances.append(float(d.norm()))
            if importances[-1] == 0.0:
                continue
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            r = int((s > cfg.svd_rtol * s[0]).sum())
            factors[n] = ((u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous())
            selected.append(i)
        return Proposal(self.modules, torch.tensor(importances), selected, LowRankDelta(factors),
                        float(loss_before or 0.0), example.n_prompt_tokens + example.n_target_tokens - 1,
                        info={"dense": True})


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

@dataclass
class MethodContext:
    """What the method factories need; editors are loaded or trained once and shared.

    hiedit_dir:  the HiEdit checkpoint (its layer spec is every method's module set)
    rledit_dir:  the RLEdit checkpoint (k = L); trained and cached when None
    mend_dir:    the MEND-style checkpoint; trained and cached when None
    train_records: facts to train missing editors on (never the evaluation stream)
    cache_dir:   where trained editors are cached, keyed by base model, layer spec and data
    """

    model: nn.Module
    tokenizer: object
    hiedit_dir: Path
    rledit_dir: Path | None = None
    mend_dir: Path | None = None
    train_records: list[EditRecord] = field(default_factory=list)
    cache_dir: Path = Path("hiedit-cache")
    seed: int = 0
    ft: FTConfig = field(default_factory=FTConfig)
    rls_layers: str | None = None
    rls_options: dict = field(default_factory=dict)     # RLSEditConfig fields for rlsedit / memit-nohist / alphaedit
    alpha_options: dict = field(default_factory=dict)   # AlphaEditParams fields for alphaedit
    train_options: dict = field(default_factory=dict)  # passed to TrainConfig for trained baselines
    progress: bool = True
    _loaded: dict = field(default_factory=dict)

    def hiedit(self) -> HiEditor:
        if "hiedit" not in self._loaded:
            self._loaded["hiedit"] = HiEditor.load(self.hiedit_dir, self.model, self.tokenizer)
        return self._loaded["hiedit"]

    @property
    def layer_spec(self) -> str:
        return self.hiedit().cfg.layer_spec

    @property
    def n_modules(self) -> int:
        return len(self.hiedit().modules)

    def load_same_spec(self, directory: Path, name: str) -> HiEditor:
        editor = HiEditor.load(directory, self.model, self.tokenizer)  # refuses another base model, naming both
        if editor.cfg.layer_spec != self.layer_spec:
            mine, theirs = self.hiedit().cfg, editor.cfg
            raise CheckpointMismatch(
                f"{name} editor {directory} edits {theirs.layer_spec!r} (trained for base fingerprint "
                f"{(theirs.base_fingerprint or '?')[:12]}), but the HiEdit editor {self.hiedit_dir} edits "
                f"{mine.layer_spec!r} (base fingerprint {(mine.base_fingerprint or '?')[:12]}): the methods must "
                "edit the same modules")
        return editor

    def base_train_options(self) -> dict:
        """The HiEdit editor's own training options, so a trained baseline differs only in what it ablates.

        Read from the checkpoint's ``train.json`` (the trainer's small log, committed with the demo
        editors); otherwise the architecture fields of its config (rank, blocks, router width,
        initial η, capture tokens).
        """
        hi = self.hiedit().cfg
        opts = {"rank": hi.rank, "n_blocks": hi.n_blocks, "router_hidden": hi.router_hidden,
                "lr_init": hi.lr_init, "tokens": hi.tokens, "max_delta_rel": hi.max_delta_rel}
        log_file = Path(self.hiedit_dir) / TRAIN_LOG_FILE
        if log_file.is_file():
            saved = json.loads(log_file.read_text()).get("cfg", {})
            known = {f.name for f in fields(TrainConfig)}
            opts.update({k: v for k, v in saved.items() if k in known})
        for transient in ("method", "stop_after", "update", "save_every"):
            opts.pop(transient, None)
        return opts

    def trained(self, name: str, k: int, update: str) -> HiEditor:
        """A HiEdit-architecture editor trained on ``train_records`` (cached under cache_dir)."""
        if name in self._loaded:
            return self._loaded[name]
        if not self.train_records:
            raise ValueError(f"{name}: no editor checkpoint was given and there are no training records to "
                             "train one on (pass its checkpoint or a dataset with training facts)")
        modules = self.hiedit().module_map
        key = hashlib.sha256(json.dumps({
            "base": base_weights_fingerprint(self.model, modules), "spec": self.layer_spec, "k": k,
            "update": update, "seed": self.seed, "opts": {**self.base_train_options(), **self.train_options},
            "cases": [r.case_id for r in self.train_records]}, sort_keys=True).encode()).hexdigest()[:12]
        out_dir = Path(self.cache_dir) / f"{name}-{key}"
        if (out_dir / "config.json").is_file() and (out_dir / "editor.safetensors").is_file():
            editor = HiEditor.load(out_dir, self.model, self.tokenizer)
        else:
            snapshot = {n: m.weight.detach().clone() for n, m in modules.items()}
            cfg = TrainConfig(**{**self.base_train_options(), **self.train_options, "update": update})
            editor = train_editor(self.model, self.tokenizer, self.layer_spec, k, self.train_records, out_dir,
                                  seed=self.seed, cfg=cfg, progress=self.progress)
            for n, m in modules.items():  # the trainer must hand the base weights back untouched
                if not torch.equal(m.weight.detach(), snapshot[n]):
                    m.weight.data = snapshot[n]
            if not (out_dir / "config.json").is_file():
                editor.save(out_dir)
        self._loaded[name] = editor
        return editor


def _rlsedit(ctx: MethodContext, reset_every_edit: bool):
    options = {"seed": ctx.seed, "cache_dir": str(Path(ctx.cache_dir) / "rlsedit-stats"), **ctx.rls_options,
               "reset_every_edit": reset_every_edit}
    editor = RLSEditor.create(ctx.model, ctx.tokenizer, layers=ctx.rls_layers, cfg=RLSEditConfig(**options))
    return editor, None


def _alphaedit(ctx: MethodContext):
    options = {"seed": ctx.seed, "cache_dir": str(Path(ctx.cache_dir) / "rlsedit-stats"), **ctx.rls_options}
    editor = AlphaEditor.create(ctx.model, ctx.tokenizer, layers=ctx.rls_layers, cfg=RLSEditConfig(**options),
                                params=AlphaEditParams(**ctx.alpha_options))
    return editor, None


def _hiedit(ctx: MethodContext):
    editor = ctx.hiedit()
    return editor, editor.cfg.k


def _rledit(ctx: MethodContext):
    if ctx.rledit_dir is not None:
        editor = ctx.load_same_spec(ctx.rledit_dir, "rledit")
    else:
        editor = ctx.trained("rledit", ctx.n_modules, "trajectory")
    return editor, len(editor.modules)


def _mend(ctx: MethodContext):
    editor = ctx.load_same_spec(ctx.mend_dir, "mend") if ctx.mend_dir is not None else \
        ctx.trained("mend", ctx.n_modules, "per_edit")
    return editor, len(editor.modules)


METHODS: dict[str, Callable[[MethodContext], tuple[Editor, int | None]]] = {
    "pre": lambda ctx: (NoEdit(), None),
    "hiedit": _hiedit,
    "rledit": _rledit,
    "mend": _mend,
    "ft": lambda ctx: (FineTuneEditor(ctx.model, ctx.tokenizer, ctx.hiedit().module_map, ctx.ft, ctx.seed), None),
    "random-k": lambda ctx: (RoutedEditor(ctx.hiedit(), "random", seed=ctx.seed), ctx.hiedit().cfg.k),
    "gradnorm-k": lambda ctx: (RoutedEditor(ctx.hiedit(), "gradnorm", seed=ctx.seed), ctx.hiedit().cfg.k),
    "rlsedit": lambda ctx: _rlsedit(ctx, reset_every_edit=False),
    "memit-nohist": lambda ctx: _rlsedit(ctx, reset_every_edit=True),
    "alphaedit": _alphaedit,
}


def default_methods() -> list[str]:
    """Every registered method, in the order of METHODS."""
    return list(METHODS)


def ft_config_dict(cfg: FTConfig) -> dict:
    return asdict(cfg)
