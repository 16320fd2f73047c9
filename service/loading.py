"""Load the served model and its editors from Settings, with errors that say what to do."""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from editor_core.assets import DEMO_HIEDIT, DEMO_MODEL
from editor_core.editor import Editor
from editor_core.hiedit import CheckpointMismatch, HiEditor
from editor_core.model import load_model

from .settings import Settings

log = logging.getLogger("hiedit.loading")


class ConfigError(RuntimeError):
    """The server cannot start with these settings; the message says how to fix it."""


def _is_local(path: str) -> bool:
    return Path(path).exists() or path.startswith((".", "/", "~"))


def check_assets(settings: Settings) -> None:
    """Fail early, before loading torch weights, when the model or editor directory is missing."""
    model = settings.model
    if _is_local(model) and not (Path(model).expanduser() / "config.json").is_file():
        hint = (" The demo model is not built yet: run `hiedit build-demo`, or pass --model DIR."
                if Path(model) == DEMO_MODEL else "")
        raise ConfigError(f"--model {model}: no config.json there, so it is not a model directory.{hint}")
    editor = settings.editor
    if settings.untrained_editor or editor.lower() == "none":
        return
    if not (Path(editor).expanduser() / "config.json").is_file():
        hint = (" The demo editor is not built yet: run `hiedit build-demo` to build it, or start without "
                "one (--editor none: generation only), or with an untrained editor "
                "(--untrained-editor 'gate[0-1],up[0-1]' --untrained-lr 1e-3)."
                if Path(editor) == DEMO_HIEDIT else "")
        raise ConfigError(f"--editor {editor}: not a HiEdit checkpoint (config.json is missing).{hint}")


def load_all(settings: Settings):
    """(model, tokenizer, {method: editor}, {method: reason unavailable})."""
    check_assets(settings)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    model, tokenizer = load_model(Path(settings.model).expanduser() if _is_local(settings.model) else settings.model,
                                  settings.dtype, settings.device)
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
    elif settings.editor.lower() != "none":
        try:
            editors["hiedit"] = HiEditor.load(Path(settings.editor).expanduser(), model, tokenizer)
        except CheckpointMismatch as e:
            raise ConfigError(f"--editor: {e}") from e
    else:
        unavailable["hiedit"] = "the server was started with --editor none"

    if settings.rlsedit == "off":
        unavailable["rlsedit"] = "the server was started with --rlsedit off"
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
