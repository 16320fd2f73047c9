"""The trainer's checkpoint in its output directory: the editor (HiEditor.save), ``trainer_state.pt``
(optimiser state and progress, to resume) and ``train.json`` (a small human-readable log), each written
atomically (a temporary file, then a rename)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .hiedit import CheckpointMismatch, HiEditor

TRAINER_STATE_FILE = "trainer_state.pt"   # optimiser state etc.: needed to resume, not to use the editor
TRAIN_LOG_FILE = "train.json"             # small, human-readable: options, seed, progress, per-trajectory losses


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(out_dir: Path, editor: HiEditor, trainer_state: dict, log: dict) -> None:
    """The editor, ``trainer_state`` (-> TRAINER_STATE_FILE) and ``log`` (-> TRAIN_LOG_FILE) into ``out_dir``."""
    editor.save(out_dir)
    _atomic_torch_save(trainer_state, out_dir / TRAINER_STATE_FILE)
    tmp = out_dir / (TRAIN_LOG_FILE + ".tmp")
    tmp.write_text(json.dumps(log, indent=1) + "\n")
    os.replace(tmp, out_dir / TRAIN_LOG_FILE)


def load_checkpoint(out_dir: Path, model: nn.Module, tokenizer, layer_spec: str, k: int) -> tuple[HiEditor, dict]:
    """(editor, trainer state) from ``out_dir``; CheckpointMismatch if it was trained for another base model,
    layer spec or k. The caller checks the state's seed and options (TrainConfig.check_resume)."""
    editor = HiEditor.load(out_dir, model, tokenizer)  # refuses another base model (CheckpointMismatch)
    if editor.cfg.layer_spec.replace(" ", "") != layer_spec.replace(" ", ""):
        raise CheckpointMismatch(f"checkpoint {out_dir} was trained with --layers {editor.cfg.layer_spec!r}, "
                                 f"not {layer_spec!r}: resume with the same layer spec or choose another --out")
    if editor.cfg.k != k:
        raise CheckpointMismatch(f"checkpoint {out_dir} was trained with --k {editor.cfg.k}, not {k}")
    state = torch.load(out_dir / TRAINER_STATE_FILE, map_location="cpu", weights_only=False)
    return editor, state
