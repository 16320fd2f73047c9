"""Load the served model and its editors from Settings, with errors that say what to do."""
from __future__ import annotations

import ctypes
import logging
import os
import re
import sys
from pathlib import Path

import torch

from editor_core.assets import DEMO_HIEDIT, DEMO_MODEL
from editor_core.catalog import KNOWN_MODELS, ModelSourceError, check_model_source, resolve_model
from editor_core.editor import Editor
from editor_core.hiedit import CheckpointMismatch, HiEditor
from editor_core.model import load_model
from editor_core.rlsedit import RLSEditor

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


def bound_heap_retention() -> bool:
    """Pin glibc malloc's mmap and trim thresholds at 128 KiB (its defaults), so that freed large blocks go
    back to the system; True when set. Not when ``MALLOC_MMAP_THRESHOLD_`` is in the environment (the
    operator's choice) or the C library is not glibc.

    Why: glibc raises its mmap threshold to the size of every large block freed (up to 32 MiB on 64-bit),
    after which blocks of that size come from the heap, where freed ones stay resident. An edit allocates
    and frees accumulators, weights and gradients of a few MB each, so a server's resident set grew by
    about 230 MB per 1,000 edits on SmolLM2 while nothing it held grew (docs/benchmarks.md, the 10,000-edit
    history); with the thresholds pinned (setting either with ``mallopt`` does) it stays flat.
    """
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 128 * 1024)) and bool(libc.mallopt(m_trim_threshold, 128 * 1024))


def load_all(settings: Settings):
    """(model, tokenizer, {method: editor}, {method: reason unavailable})."""
    check_assets(settings)
    bound_heap_retention()  # before the model's tensors are allocated
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
    else:
        try:
            overrides = {"cache_dir": str(settings.home / "cache" / "rlsedit-stats")}
            if settings.rlsedit_stats_tokens:
                overrides["stats_max_tokens"] = settings.rlsedit_stats_tokens
            if settings.rlsedit_stats_corpus:
                overrides["stats_corpus"] = settings.rlsedit_stats_corpus
            editors["rlsedit"] = RLSEditor.create(model, tokenizer, layers=settings.rlsedit_layers,
                                                      stats=settings.rlsedit_stats, **overrides)
            overlap = editor_overlap(editors)
            if overlap is not None and settings.rlsedit_overlap == "refuse":
                del editors["rlsedit"]
                raise ConfigError(f"{overlap}; start with --rlsedit-layers below the HiEdit layers, an editor on "
                                  "higher layers, --rlsedit-overlap allow (docs/rlsedit.md#two-editors-on-one-model) "
                                  "or --rlsedit off")
            if overlap is not None:
                log.warning("--rlsedit-overlap allow: %s", overlap)
        except Exception as e:  # it does not fit this model (e.g. its statistics cannot be collected)
            if settings.rlsedit == "on":
                raise ConfigError(f"--rlsedit on: RLSEdit cannot be created for this model: {e}") from e
            unavailable["rlsedit"] = _why_rlsedit_is_off(e, settings)
    for method, reason in unavailable.items():  # one line each, at start, so an operator sees what is off and why
        log.warning("%s is OFF: %s", method, reason)
    return model, tokenizer, editors, unavailable


def editor_overlap(editors: dict[str, Editor]) -> str | None:
    """Why HiEdit's edits would make RLSEdit's history stale, or None when they cannot.

    RLSEdit's keys at layer m are the inputs of down_proj m: act(gate(x)) * up(x), where x comes out of
    every layer below m. A HiEdit edit of gate/up at a layer l <= m changes them for every past fact,
    while C keeps the keys the facts had when they were edited (docs/rlsedit.md, "Two editors")."""
    if "hiedit" not in editors or "rlsedit" not in editors:
        return None
    hi: dict[int | None, str] = {}
    rls: dict[int | None, str] = {}
    for layers, editor in ((hi, editors["hiedit"]), (rls, editors["rlsedit"])):
        for name in editor.modules:
            layers.setdefault(_layer_of(name), name)  # the first module of a layer names it
    if None in hi or None in rls or min(hi) > max(rls):
        return None
    return (f"HiEdit edits {hi[min(hi)]}, at or below RLSEdit's {rls[max(rls)]}: every HiEdit edit would change "
            "the keys RLSEdit's history (C) was built from")


def _layer_of(module: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", module)
    return int(m.group(1)) if m else None


def _why_rlsedit_is_off(e: Exception, settings: Settings) -> str:
    if isinstance(e, ConfigError):
        return str(e)
    from editor_core.stats import DEFAULT_CORPUS, StatsError

    corpus = Path(settings.rlsedit_stats_corpus) if settings.rlsedit_stats_corpus else DEFAULT_CORPUS
    if isinstance(e, StatsError) and settings.rlsedit_stats is None and not corpus.exists():
        where = (f"HIEDIT_RLSEDIT_STATS_CORPUS={corpus} does not exist" if settings.rlsedit_stats_corpus else
                 f"the default one ({corpus}, in the repository's ../shared/data) is not here, as in an installed "
                 "package")
        return (f"its second-moment statistics need a text corpus, and {where}. Put .txt/.json/.jsonl text there "
                "or point HIEDIT_RLSEDIT_STATS_CORPUS (--rlsedit-stats-corpus) at some, or set HIEDIT_RLSEDIT_STATS "
                "(--rlsedit-stats) to statistics collected elsewhere; --rlsedit off says it is meant to be off")
    return f"RLSEdit could not be created: {type(e).__name__}: {e}"


__all__ = ["ConfigError", "check_assets", "load_all", "DEMO_MODEL", "DEMO_HIEDIT"]
