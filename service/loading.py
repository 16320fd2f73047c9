"""Load the served model and its editors from Settings, with errors that say what to do."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from editor_core.assets import DEMO_HIEDIT, DEMO_MODEL
from editor_core.catalog import KNOWN_MODELS, ModelSourceError, check_model_source, resolve_model
from editor_core.editor import Editor
from editor_core.hiedit import CheckpointMismatch, HiEditor
from editor_core.model import load_model

from .settings import Settings

log = logging.getLogger("hiedit.loading")


class ConfigError(RuntimeError):
    """The server cannot start with these settings; the message says how to fix it."""


def editor_path(settings: Settings) -> Path | None:
    """The HiEdit checkpoint to load: --editor, else the committed editor of a known --model; None = no editor."""
    if settings.untrained_editor:
        return None
    if settings.editor is not None:
        return None if settings.editor.lower() == "none" else Path(settings.editor).expanduser()
    known = KNOWN_MODELS.get(settings.model)
    if known is not None:
        return known.editor
    if Path(settings.model).expanduser() == DEMO_MODEL:
        return DEMO_HIEDIT
    raise ConfigError(f"--model {settings.model}: hiedit has no committed editor for this model; pass --editor DIR "
                      "(a checkpoint of `hiedit train` for it), --editor none (generation only) or "
                      "--untrained-editor LAYER_SPEC")


def check_assets(settings: Settings) -> None:
    """Fail early, before loading torch weights or converting a GGUF, when the model or editor is missing."""
    try:
        check_model_source(settings.model, settings.home)
    except ModelSourceError as e:
        hint = (" The demo model is not built yet: run `hiedit build-demo`."
                if Path(settings.model).expanduser() == DEMO_MODEL else "")
        raise ConfigError(f"{e}{hint}") from None
    editor = editor_path(settings)
    if editor is None:
        return
    if not (editor / "config.json").is_file():
        known = KNOWN_MODELS.get(settings.model)
        hint = ""
        if known is not None and editor == known.editor:
            hint = (f" The committed editor of {known.name} is missing from this checkout; rebuild it with the "
                    "command in docs/editors.md, or start without one (--editor none: generation only).")
        elif editor == DEMO_HIEDIT:
            hint = " The demo editor is not built yet: run `hiedit build-demo`, or start with --editor none."
        raise ConfigError(f"--editor {editor}: not a HiEdit checkpoint (config.json is missing).{hint}")


def load_all(settings: Settings):
    """(model, tokenizer, {method: editor}, {method: reason unavailable})."""
    check_assets(settings)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    try:
        model_path = resolve_model(settings.model, settings.home)  # converts a GGUF once, under --home
    except ModelSourceError as e:
        raise ConfigError(str(e)) from None
    model, tokenizer = load_model(model_path, settings.dtype, settings.device)
    editor = editor_path(settings)
    editors: dict[str, Editor] = {}
    unavailable: dict[str, str] = {}
    if settings.untrained_editor:
        try:
            overrides = {"lr_init": settings.untrained_lr}
            editors["hiedit"] = HiEditor.create(model, tokenizer, settings.untrained_editor, k=settings.untrained_k,
                                                **overrides)
        except ValueError as e:
            raise ConfigError(f"--untrained-editor {settings.untrained_editor!r}: {e}") from e
        log.warning("serving an UNTRAINED HiEdit editor (a scaled gradient step, lr %g)", settings.untrained_lr)
    elif editor is not None:
        try:
            editors["hiedit"] = HiEditor.load(editor, model, tokenizer)
        except CheckpointMismatch as e:
            raise ConfigError(f"--editor: {e}") from e
    else:
        unavailable["hiedit"] = "the server was started with --editor none"

    if settings.rlsedit == "off":
        unavailable["rlsedit"] = "the server was started with --rlsedit off"
    elif getattr(model.config, "model_type", "") == "gemma3_text":
        # Measured: an RLSEdit edit raises the target's loss on Gemma-3-270M (2.94 -> 9.21, docs/models.md);
        # a likely cause, not yet checked: Gemma-3 normalises the MLP output (post_feedforward_layernorm)
        # before the residual, between down_proj and the hidden state the value solve targets.
        reason = "RLSEdit does not edit Gemma-3 models correctly yet (docs/models.md)"
        if settings.rlsedit == "on":
            raise ConfigError(f"--rlsedit on: {reason}")
        unavailable["rlsedit"] = reason
        log.warning("rlsedit disabled: %s", reason)
    else:
        try:
            rls = importlib.import_module("editor_core.rlsedit")
            overrides = {"cache_dir": str(settings.home / "cache" / "rlsedit-stats")}
            if settings.rlsedit_stats_tokens:
                overrides["stats_max_tokens"] = settings.rlsedit_stats_tokens
            editors["rlsedit"] = rls.RLSEditor.create(model, tokenizer, layers=settings.rlsedit_layers, **overrides)
        except Exception as e:  # ImportError while it is being written, or it does not fit this model
            if settings.rlsedit == "on":
                raise ConfigError(f"--rlsedit on: RLSEdit cannot be created for this model: {e}") from e
            unavailable["rlsedit"] = f"RLSEdit could not be created: {type(e).__name__}: {e}"
            log.warning("rlsedit disabled: %s", unavailable["rlsedit"])
    return model, tokenizer, editors, unavailable


__all__ = ["ConfigError", "check_assets", "load_all", "DEMO_MODEL", "DEMO_HIEDIT"]
