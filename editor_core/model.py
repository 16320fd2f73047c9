"""Load a causal LM and name the MLP projections an editor may change.

A *layer spec* lists editable modules as ``kind[layers]`` items, for example
``gate[11-15],up[18-24]`` (HiEdit's Llama-3 ZsRE setting) or ``down[4-8]`` (RLSEdit).
The order of the spec is the module index used by routers and masks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MODULE_KINDS: dict[str, str] = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
_ITEM = re.compile(r"^\s*([a-z_]+)\s*\[\s*(\d+)\s*(?:-\s*(\d+)\s*)?\]\s*$")


class LayerSpecError(ValueError):
    """A layer spec names an unknown module kind or a layer the model does not have."""


@dataclass(frozen=True)
class ModuleRef:
    """One editable ``nn.Linear``: its kind (gate/up/down), decoder layer and dotted name."""

    kind: str
    layer: int
    name: str  # e.g. "model.layers.11.mlp.gate_proj"

    @property
    def short(self) -> str:
        return f"{self.kind}{self.layer}"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(set(DTYPES))}") from None


def _split_items(spec: str) -> list[str]:
    """Split on commas that are outside brackets."""
    items, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    return [i for i in items if i.strip()]


def parse_layer_spec(spec: str, num_layers: int, prefix: str = "model.layers") -> list[ModuleRef]:
    """``"gate[11-15],up[18-24]"`` -> ModuleRefs in spec order.

    Raises LayerSpecError for an unknown kind, a reversed or out-of-range layer range,
    a malformed item or a module listed twice.
    """
    if not spec or not spec.strip():
        raise LayerSpecError("layer spec is empty; expected e.g. 'gate[11-15],up[18-24]'")
    refs: list[ModuleRef] = []
    for item in _split_items(spec):
        match = _ITEM.match(item)
        if not match:
            raise LayerSpecError(f"layer spec item {item.strip()!r} is not of the form kind[a-b] or kind[a]")
        kind, lo, hi = match.group(1), int(match.group(2)), int(match.group(3) or match.group(2))
        if kind not in MODULE_KINDS:
            raise LayerSpecError(f"unknown module kind {kind!r} in layer spec; known kinds: {sorted(MODULE_KINDS)}")
        if hi < lo:
            raise LayerSpecError(f"layer range {lo}-{hi} in {item.strip()!r} is reversed")
        if hi >= num_layers:
            raise LayerSpecError(
                f"layer {hi} in {item.strip()!r} is out of range: the model has layers 0-{num_layers - 1}")
        for layer in range(lo, hi + 1):
            refs.append(ModuleRef(kind, layer, f"{prefix}.{layer}.mlp.{MODULE_KINDS[kind]}"))
    names = [r.name for r in refs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LayerSpecError(f"layer spec lists modules more than once: {dupes}")
    return refs


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama/Gemma-style causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers: only Llama/Gemma-style decoders are supported")
    return layers


def resolve_modules(model: nn.Module, spec: str) -> dict[str, nn.Linear]:
    """Parse ``spec`` against ``model`` and return {dotted name: nn.Linear} in spec order."""
    refs = parse_layer_spec(spec, len(decoder_layers(model)))
    out: dict[str, nn.Linear] = {}
    for ref in refs:
        module = model.get_submodule(ref.name)
        if not isinstance(module, nn.Linear):
            raise LayerSpecError(f"{ref.name} is a {type(module).__name__}, not an nn.Linear")
        out[ref.name] = module
    return out


def module_refs(model: nn.Module, spec: str) -> list[ModuleRef]:
    return parse_layer_spec(spec, len(decoder_layers(model)))


def load_model(name_or_path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load ``(model, tokenizer)`` with ``from_pretrained`` from a local directory or a hub id.

    The model is put in eval mode with every parameter frozen: editors turn gradients on
    only for the weights they capture, and only for as long as they need them.
    Gemma-2 uses eager attention, as its soft-capping requires.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    path = str(name_or_path)
    config = AutoConfig.from_pretrained(path)
    kwargs = {"dtype": torch_dtype}
    if getattr(config, "model_type", "") in ("gemma2", "gemma3_text"):
        kwargs["attn_implementation"] = "eager"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    decoder_layers(model)  # fail early on unsupported architectures
    return model, tokenizer


def model_id(model: nn.Module) -> str:
    """A stable name for the base model (its hub id or the last part of its directory)."""
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    return Path(name).name if Path(name).exists() else name
