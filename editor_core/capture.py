"""Teacher-forced edit loss and per-token (u, δ) capture of the editable modules.

For a fact (prompt, target) the target is scored teacher-forced after a separating space::

    input_ids = prompt_ids ⊕ target_ids[:-1]
    labels    = [-100] * (len(prompt_ids) - 1) ⊕ target_ids       (already shifted)
    L         = mean over target tokens of CE(logits[i], labels[i])

One forward + backward at the current weights then gives, for every editable module l and
every captured token t, its input u_t (d_in) and output gradient δ_t = ∂L/∂(W_l u_t) (d_out):
the weight gradient is ∇_W L = Σ_t δ_t u_tᵀ, and editors act on these factors.

Only the editable weights take part in autograd, and even their dense gradients are never
formed: ``torch.autograd.grad`` is asked for the module outputs alone.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MAX_PROMPT_TOKENS = 256
DEFAULT_MAX_TARGET_TOKENS = 32


class EditInputError(ValueError):
    """A fact that cannot be edited as given (empty target, too long, untokenizable ...)."""


@dataclass
class TeacherForced:
    """One teacher-forced example. ``input_ids``, ``labels``: [1, T] long tensors."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    n_prompt_tokens: int
    n_target_tokens: int

    @property
    def target_positions(self) -> torch.Tensor:
        """[n_target] positions i whose logits predict a target token."""
        return (self.labels[0] != -100).nonzero().squeeze(-1)

    def to(self, device: torch.device | str) -> "TeacherForced":
        return TeacherForced(self.input_ids.to(device), self.labels.to(device), self.n_prompt_tokens, self.n_target_tokens)


def target_text(prompt: str, target: str) -> str:
    """The target as it continues the prompt: one separating space unless the prompt ends in one."""
    stripped = target.strip()
    return stripped if prompt[-1:].isspace() else " " + stripped


def teacher_forced(tokenizer, prompt: str, target: str,
                   max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                   max_target_tokens: int = DEFAULT_MAX_TARGET_TOKENS) -> TeacherForced:
    """Tokenize a fact for teacher forcing; EditInputError names the offending field."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise EditInputError("prompt: must be a non-empty string")
    if not isinstance(target, str) or not target.strip():
        raise EditInputError("target: must be a non-empty string that is not only whitespace")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(target_text(prompt, target), add_special_tokens=False)["input_ids"]
    n_special = len(tokenizer("", add_special_tokens=True)["input_ids"])
    if len(prompt_ids) <= n_special:
        raise EditInputError("prompt: tokenizes to no tokens")
    if not target_ids:
        raise EditInputError("target: tokenizes to no tokens")
    if len(prompt_ids) > max_prompt_tokens:
        raise EditInputError(f"prompt: {len(prompt_ids)} tokens, over the limit of {max_prompt_tokens}")
    if len(target_ids) > max_target_tokens:
        raise EditInputError(f"target: {len(target_ids)} tokens, over the limit of {max_target_tokens}")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in target_ids:
        raise EditInputError("target: contains characters the tokenizer cannot encode")
    input_ids = prompt_ids + target_ids[:-1]
    labels = [-100] * (len(prompt_ids) - 1) + target_ids
    return TeacherForced(torch.tensor([input_ids]), torch.tensor([labels]), len(prompt_ids), len(target_ids))


def target_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE over target positions. logits [B, T, V], labels [B, T] (shifted, -100 = ignore)."""
    mask = labels != -100
    return F.cross_entropy(logits[mask].float(), labels[mask])


@dataclass
class Capture:
    """What one forward + backward saw.

    keys[name]:  [n_tok, d_in]  float32 inputs u_t of the module
    grads[name]: [n_tok, d_out] float32 output gradients δ_t
    loss:        the teacher-forced loss at the current weights
    """

    keys: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    loss: float

    @property
    def n_tokens(self) -> int:
        return next(iter(self.keys.values())).shape[0]


@contextlib.contextmanager
def thread_hooks(pairs: list[tuple[nn.Module, Callable]]):
    """Forward hooks that act only in the calling thread.

    The service generates in other threads on the same model while the writer captures;
    their forward passes run through these hooks untouched, so they neither overwrite a
    capture nor see an editor's temporary overrides.
    """
    owner = threading.get_ident()

    def guard(fn):
        def wrapped(module, args, out):
            return fn(module, args, out) if threading.get_ident() == owner else None
        return wrapped

    handles = [m.register_forward_hook(guard(fn)) for m, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _grad_only_for(weights: list[nn.Parameter]):
    """Turn requires_grad on for ``weights`` alone, restoring the previous flags after."""
    before = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        yield
    finally:
        for w, flag in zip(weights, before):
            w.requires_grad_(flag)


def capture(model: nn.Module, modules: dict[str, nn.Linear], example: TeacherForced,
            tokens: str = "all") -> Capture:
    """One forward + backward of ``model`` on ``example``; returns u and δ of every module.

    tokens: "all" captures every position (prompt + teacher-forced target, MEND-style HiEdit),
            "target" only the positions that predict target tokens (MALMEN/RLEdit style).
    """
    if tokens not in ("all", "target"):
        raise ValueError(f"tokens must be 'all' or 'target', not {tokens!r}")
    device = next(model.parameters()).device
    example = example.to(device)
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_module, args, out):
            inputs[name] = args[0].detach()
            outputs[name] = out
        return fn

    names = list(modules)
    with thread_hooks([(m, hook(n)) for n, m in modules.items()]), \
            _grad_only_for([m.weight for m in modules.values()]), torch.enable_grad():
        logits = model(input_ids=example.input_ids).logits
        loss = target_loss(logits, example.labels)
        grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    pos = slice(None) if tokens == "all" else example.target_positions
    keys = {n: inputs[n][0, pos].float() for n in names}
    out_grads = {n: g[0, pos].float() for n, g in zip(names, grads)}
    return Capture(keys, out_grads, float(loss.detach()))
