"""HiEdit at edit time: capture (u, δ), route to the top-k modules, run only their editor nets.

    p = Router(u, δ)                    importances over the L editable modules
    S = topk(p, k)                      the modules this fact changes
    ΔW_l = -η_l Σ_t ũ_t δ̃_tᵀ, l ∈ S      kept as two factors, never made dense

A checkpoint is a directory with ``editor.safetensors`` (router + low-level nets) and
``config.json`` (layer spec, k, dimensions, base model id, a fingerprint of the base
model's editable weights). ``HiEditor.load`` refuses a checkpoint made for another model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .capture import (DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_TARGET_TOKENS, Capture, capture,
                      teacher_forced)
from .delta import LowRankDelta, frobenius_sq
from .editor import EditRequest, Proposal, StatelessEditor
from .model import model_id, resolve_modules
from .nets import LowLevelNet, Router, topk_ste
from .state import weights_fingerprint

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "editor.safetensors"


class CheckpointMismatch(ValueError):
    """An editor checkpoint made for another model, dtype-independent weights or layer spec."""


@dataclass
class HiEditConfig:
    """Everything needed to rebuild the editor nets; saved as the checkpoint's config.json."""

    layer_spec: str                      # e.g. "gate[22-30],up[22-30]"
    k: int                               # modules edited per fact (paper: L/2)
    rank: int = 256                      # r of each editor block (paper: 1920 at D = 18432)
    n_blocks: int = 2
    router_hidden: int = 256             # encoder width (paper Table 4: 256)
    lr_init: float = 1e-6                # initial η_l
    tokens: str = "all"                  # capture positions: "all" (MEND style) or "target"
    max_delta_rel: float = 0.0           # trust region ρ: ‖ΔW_l‖_F ≤ ρ ‖W_l⁰‖_F per edit (0 = none, the paper)
    weight_norms: list[float] = field(default_factory=list)  # ‖W_l⁰‖_F per module, filled from the model
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    max_target_tokens: int = DEFAULT_MAX_TARGET_TOKENS
    shapes: list[list[int]] = field(default_factory=list)  # (d_in, d_out) per module, filled from the model
    base_model: str = ""
    base_fingerprint: str = ""           # of the editable weights rounded to bf16 (dtype-independent)
    method: str = "hiedit"


def base_weights_fingerprint(model: nn.Module, modules: dict[str, nn.Linear]) -> str:
    """Identity of a base model's editable weights, the same whether it is served in fp32, fp16 or bf16."""
    return weights_fingerprint("", ((n, m.weight.detach().to(torch.bfloat16)) for n, m in modules.items()))


class HiEditNet(nn.Module):
    """The trainable part: the router and one low-level net per weight shape."""

    def __init__(self, cfg: HiEditConfig):
        super().__init__()
        self.cfg = cfg
        shapes = [tuple(s) for s in cfg.shapes]
        if not shapes:
            raise ValueError("HiEditConfig.shapes is empty: build the config with HiEditor.create")
        if cfg.max_delta_rel and len(cfg.weight_norms) != len(shapes):
            raise ValueError("HiEditConfig.max_delta_rel needs weight_norms for every module: build the config "
                             "with HiEditor.create")
        self.router = Router(shapes, cfg.router_hidden)
        self.nets = nn.ModuleDict()
        self.index_in_group: list[int] = []
        for shape in sorted(set(shapes)):
            members = [i for i, s in enumerate(shapes) if s == shape]
            self.nets[Router.key(shape)] = LowLevelNet(shape[0], shape[1], cfg.rank, cfg.n_blocks,
                                                       len(members), cfg.lr_init)
            # The router's encoder and the low-level net of a shape normalise the same rows [u ; δ]: one
            # RunningNorm serves both (a checkpoint still stores it under both names, with equal values).
            self.nets[Router.key(shape)].norm = self.router.norms[Router.key(shape)]
        for i, s in enumerate(shapes):
            self.index_in_group.append([j for j, t in enumerate(shapes) if t == s].index(i))
        self.shapes = shapes

    def net_for(self, l: int) -> LowLevelNet:
        return self.nets[Router.key(self.shapes[l])]

    def update_norms(self, keys: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Fold one capture into the running normalisers (one per weight shape, shared by both levels)."""
        self.router.update_norms(keys, grads)

    def importances(self, keys: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        return self.router(keys, grads)

    def factors(self, l: int, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(left [d_out, n], right [n, d_in]) of ΔW_l; differentiable in the net's parameters."""
        return self.net_for(l).factors([u], [delta], [self.index_in_group[l]])[0]

    def factors_many(self, modules: list[int], keys: list[torch.Tensor], grads: list[torch.Tensor],
                     trust_region: bool = True) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{l: (left, right)} for the given module indices, one batched pass per weight shape.

        keys/grads are indexed by module (all L of them); only ``modules`` are run. With
        ``trust_region`` each ΔW_l is scaled into its trust region (``within_trust_region``).
        """
        out = {}
        for shape in sorted(set(self.shapes[l] for l in modules)):
            members = [l for l in modules if self.shapes[l] == shape]
            pairs = self.nets[Router.key(shape)].factors([keys[l] for l in members], [grads[l] for l in members],
                                                         [self.index_in_group[l] for l in members])
            out.update(zip(members, pairs))
        if trust_region:
            out = {l: self.within_trust_region(l, left, right) for l, (left, right) in out.items()}
        return out

    def within_trust_region(self, l: int, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW_l · min(1, ρ ‖W_l⁰‖_F / ‖ΔW_l‖_F): one edit never moves a module by more than ρ of its norm.

        Departure from the paper, which bounds ΔW only softly (λ‖ΔW‖²). The editor's input is a
        gradient, and a fact the drifting model gets badly wrong has an outsized gradient; on a small
        model one such edit, scaled by a net that never saw it, can be larger than the weights it
        edits and wreck every later answer. The scaling is differentiable, so training learns to
        produce updates that work inside the region. ρ = 0 turns it off.
        """
        if not self.cfg.max_delta_rel:
            return left, right
        bound = self.cfg.max_delta_rel * self.cfg.weight_norms[l]
        norm = frobenius_sq(left, right).clamp_min(0).sqrt()
        return left * torch.clamp(bound / (norm + 1e-12), max=1.0), right


class HiEditor(StatelessEditor):
    """HiEdit bound to a model: ``propose(request, k)`` -> Proposal. Never changes weights."""

    method = "hiedit"

    def __init__(self, net: HiEditNet, model: nn.Module, tokenizer):
        self.net = net.eval()
        self.cfg = net.cfg
        self.method = net.cfg.method
        self.model = model
        self.tokenizer = tokenizer
        self.module_map = resolve_modules(model, self.cfg.layer_spec)
        self.modules = list(self.module_map)
        device = next(model.parameters()).device
        self.net.to(device)

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def create(cls, model: nn.Module, tokenizer, layer_spec: str, k: int | None = None, seed: int = 0,
               **overrides) -> "HiEditor":
        """A freshly initialised (untrained) editor for ``model``; k defaults to L/2."""
        modules = resolve_modules(model, layer_spec)
        shapes = [[m.in_features, m.out_features] for m in modules.values()]
        norms = [float(m.weight.detach().float().norm()) for m in modules.values()]
        cfg = HiEditConfig(layer_spec=layer_spec, k=k or max(1, len(modules) // 2), shapes=shapes, weight_norms=norms,
                           base_model=model_id(model), base_fingerprint=base_weights_fingerprint(model, modules),
                           **overrides)
        if not 1 <= cfg.k <= len(modules):
            raise ValueError(f"k={cfg.k} is out of range: the layer spec has {len(modules)} modules")
        torch.manual_seed(seed)
        return cls(HiEditNet(cfg), model, tokenizer)

    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write config.json and the nets' weights; ``dtype`` (e.g. float16) stores the parameters in it
        (``load`` casts them back to the nets' float32). The normalisers' running statistics stay float32:
        their counts and second moments overflow float16 (90,464 and 3.5e5 on SmolLM2)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        params = {name for name, _ in self.net.named_parameters()}
        state = {k: (v.to(dtype) if dtype is not None and k in params else v).detach().cpu().contiguous().clone()
                 for k, v in self.net.state_dict().items()}  # clone: the shared normaliser appears under two names
        save_file(state, directory / WEIGHTS_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module, tokenizer) -> "HiEditor":
        """Load a checkpoint; CheckpointMismatch if it was trained for a different base model."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{directory} is not an editor checkpoint: {CONFIG_FILE} is missing")
        cfg = HiEditConfig(**json.loads((directory / CONFIG_FILE).read_text()))
        try:
            modules = resolve_modules(model, cfg.layer_spec)
        except ValueError as e:
            raise CheckpointMismatch(f"editor {directory} does not fit this model: {e}") from e
        shapes = [[m.in_features, m.out_features] for m in modules.values()]
        fp = base_weights_fingerprint(model, modules)
        if shapes != cfg.shapes:
            raise CheckpointMismatch(f"editor {directory} was built for module shapes {cfg.shapes[:2]}... of base model "
                                     f"{cfg.base_model!r} (editable-weight fingerprint {(cfg.base_fingerprint or '?')[:12]}), "
                                     f"but {cfg.layer_spec!r} of the loaded model {model_id(model)!r} has shapes "
                                     f"{shapes[:2]}... (fingerprint {fp[:12]}): load the model it was trained for")
        if cfg.base_fingerprint and fp != cfg.base_fingerprint:
            raise CheckpointMismatch(
                f"editor {directory} was trained for base model {cfg.base_model!r} "
                f"(editable-weight fingerprint {cfg.base_fingerprint[:12]}), but the loaded model "
                f"{model_id(model)!r} has fingerprint {fp[:12]}: load the model it was trained for")
        net = HiEditNet(cfg)
        net.load_state_dict(load_file(directory / WEIGHTS_FILE))
        return cls(net, model, tokenizer)

    # ---- edit path ------------------------------------------------------------------------------

    def capture(self, prompt: str, target: str) -> Capture:
        example = teacher_forced(self.tokenizer, prompt, target, self.cfg.max_prompt_tokens,
                                 self.cfg.max_target_tokens)
        return capture(self.model, self.module_map, example, self.cfg.tokens)

    @torch.no_grad()
    def propose(self, request: EditRequest, k: int | None = None, selected: list[int] | None = None) -> Proposal:
        """Route the fact and build the low-rank delta of its top-k modules (or of ``selected``, module
        indices the caller keeps from an earlier routing: the service's strengthening steps do).

        The normalisers are frozen here (the published code keeps updating them during
        evaluation): a proposal then depends only on the checkpoint and the current
        weights, so it is reproducible and replicas agree on what the writer would do.
        """
        k = self.cfg.k if k is None else k
        if not 1 <= k <= len(self.modules):
            raise ValueError(f"k={k} is out of range: choose 1..{len(self.modules)}")
        cap = self.capture(request.prompt, request.target)
        keys = [cap.keys[n] for n in self.modules]
        grads = [cap.grads[n] for n in self.modules]
        p = self.net.importances(keys, grads)
        selected = sorted(p.topk(k).indices.tolist()) if selected is None else sorted(selected)
        return Proposal(self.modules, p.float().cpu(), selected, self.delta_for(cap, selected), cap.loss,
                        cap.n_tokens)

    @torch.no_grad()
    def delta_for(self, cap: Capture, selected: list[int]) -> LowRankDelta:
        """The low-rank delta of the ``selected`` module indices: only their low-level nets run."""
        keys = [cap.keys[n] for n in self.modules]
        grads = [cap.grads[n] for n in self.modules]
        return LowRankDelta({self.modules[l]: (left.contiguous(), right.contiguous())
                             for l, (left, right) in self.net.factors_many(selected, keys, grads).items()})

    def route(self, cap: Capture, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable routing for training: (p [L], m [L]) with m = STE top-k mask."""
        p = self.net.importances([cap.keys[n] for n in self.modules], [cap.grads[n] for n in self.modules])
        return p, topk_ste(p, k)
