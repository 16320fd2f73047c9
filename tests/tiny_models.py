"""Tiny Llama and Gemma-2 models, built once per test session into a temp dir (no downloads)."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from editor_core.tiny import build_tiny_model

TINY = dict(hidden=48, layers=4, intermediate=96, heads=4, kv_heads=2)


@functools.lru_cache(maxsize=None)
def tiny_model_dir(arch: str = "llama", seed: int = 0) -> Path:
    out = Path(tempfile.mkdtemp(prefix=f"hiedit-tiny-{arch}-"))
    return build_tiny_model(out, arch=arch, seed=seed, **TINY)
