"""Edits out of the server: a merged model directory, or a PEFT LoRA adapter, for the engines of a fleet.

Every edit is a sum of low-rank products ΔW = L R (``editor_core.delta``), which is a LoRA adapter's shape:
W' = W + (α/r) B A with B = L [d_out, r], A = R [r, d_in] and α = r. Two formats:

* ``merged``: a Hugging Face model directory (config, tokenizer, safetensors) whose editable weights are
  ``WeightState.served_with(edits)``: the same float operations a replay performs, so with the active
  edits it is bit-identical to the served weights, in the served dtype (transformers, vLLM, SGLang's
  ``/update_weights_from_disk``).
* ``peft``: adapter_config.json + adapter_model.safetensors, one LoRA pair per edited module (target
  modules named per layer). Exact by default: the edits' factors concatenated, rank = the sum of their
  ranks on the module. ``rank=r`` truncates each module's ΔW to its best rank-r approximation (SVD), and the
  measured relative Frobenius error of each module is reported. One r for every module (shorter factors are
  padded with zeros, which change nothing) because vLLM's loader reads ``r`` and ``lora_alpha`` only, not
  PEFT's per-module ``rank_pattern``.

The edits come from the log (never from the server's memory), so a stopped server's log exports the same
as a running one's; ``fingerprint`` is what GET /state reports for weights holding exactly these edits.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from editor_core.delta import LowRankDelta
from editor_core.state import DeltaRejected, weights_fingerprint

from . import crud
from .engine import EditEngine
from .engine.errors import Conflict, InvalidRequest, NotFound
from .models import EditStatus

FORMATS = ("merged", "peft")
MANIFEST = "hiedit_export.json"


@dataclass
class ExportResult:
    path: str
    format: str
    model: str
    edits: list[int]
    fingerprint: str  # of the served weights holding exactly ``edits`` (GET /state's "fingerprint")
    base_fingerprint: str  # the base model's identity (edits.base_fingerprint)
    rank: int | None = None  # peft: the adapter's r
    exact_rank: int | None = None  # peft: the largest rank any module's edits need
    errors: dict[str, float] = field(default_factory=dict)  # peft: module -> ‖ΔW - BA‖_F / ‖ΔW‖_F
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def export(engine: EditEngine, fmt: str, out: str | Path, edits: list[int] | None = None,
           rank: int | None = None, overwrite: bool = False) -> ExportResult:
    """Write the edits ``edits`` (default: every applied one) of ``engine``'s log to ``out`` as ``fmt``.

    The directory appears complete or not at all: it is written beside ``out`` and renamed into place.
    Raises InvalidRequest (bad format, rank or edit list), NotFound (an id not in the log), Conflict (``out``
    exists and is not empty, without ``overwrite``).
    """
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise InvalidRequest(f"format: {fmt!r} is not one of {', '.join(FORMATS)}", 400)
    if rank is not None and fmt != "peft":
        raise InvalidRequest("rank: only a peft adapter has a rank (the merged model is exact)", 400)
    if rank is not None and rank < 1:
        raise InvalidRequest(f"rank: must be at least 1, got {rank}", 400)
    out = Path(out).expanduser().absolute()
    _check_target(out, overwrite)
    chosen = chosen_edits(engine, edits)
    if fmt == "peft" and not chosen:
        raise InvalidRequest("edits: there are no edits to export; an adapter of no edits is the base model "
                             "(export that with format merged and no edits)", 400)
    try:
        served = engine.state.served_with(chosen)
    except DeltaRejected as e:
        raise InvalidRequest(f"edits: {e}", 400) from None
    fingerprint = weights_fingerprint(engine.model_name, ((n, served[n]) for n in engine.state.modules))
    result = ExportResult(str(out), fmt, engine.model_name, [i for i, _ in chosen], fingerprint,
                          engine.base_fingerprint)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "merged":
            _write_merged(engine, served, tmp)
        else:
            _write_peft(engine, chosen, rank, tmp, result)
        result.seconds = round(time.perf_counter() - t0, 3)
        (tmp / MANIFEST).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
        if out.exists():  # empty, or --overwrite: checked above
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise Conflict(f"out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise Conflict(f"out: {out} exists and is not empty; choose another path, or replace it "
                       "(hiedit export --overwrite; \"overwrite\": true in POST /export)")
    if not out.parent.is_dir():
        raise InvalidRequest(f"out: the parent directory {out.parent} does not exist", 400)


def chosen_edits(engine: EditEngine, edits: list[int] | None) -> list[tuple[int, LowRankDelta]]:
    """[(id, delta)] of ``edits`` (default: every applied edit), ascending id; every one must be applied."""
    with engine.sessions() as session:
        applied = crud.applied_edit_ids(session)
        if edits is None:
            ids = applied
        else:
            ids = sorted(set(edits))
            wanted = set(applied)
            for edit_id in ids:
                if edit_id in wanted:
                    continue
                row = crud.get_edit(session, edit_id)
                if row is None:
                    raise NotFound(f"edits: edit {edit_id} is not in the log")
                raise InvalidRequest(f"edits: edit {edit_id} is {row.status}, not {EditStatus.APPLIED}: only "
                                     "applied edits are part of the served weights", 400)
    if ids:
        engine.check_base_model(ids)  # edits made on another base model never land on this one
    chosen: list[tuple[int, LowRankDelta]] = []
    for rows in engine.stored_edits(ids):
        chosen.extend((edit.id, LowRankDelta.from_bytes(stored.blob)) for edit, stored in rows)
    engine.check_modules_served(chosen)
    return chosen


def _write_merged(engine: EditEngine, served: dict[str, torch.Tensor], out: Path) -> None:
    """The model's own files with the editable modules' weights replaced by ``served``."""
    state = engine.model.state_dict()
    for name, weight in served.items():
        state[f"{name}.weight"] = weight
    engine.model.save_pretrained(out, state_dict=state)
    engine.tokenizer.save_pretrained(out)


def _write_peft(engine: EditEngine, chosen: list[tuple[int, LowRankDelta]], rank: int | None, out: Path,
                result: ExportResult) -> None:
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for _, delta in chosen:
        for name, pair in delta.factors.items():
            parts.setdefault(name, []).append(pair)
    order = [n for n in engine.state.modules if n in parts]  # the model's module order
    # per module, one concatenation: [L_1 | L_2 | ...] [R_1; R_2; ...], id order (rank = the sum of the ranks)
    factors = {n: (torch.cat([l for l, _ in parts[n]], 1), torch.cat([r for _, r in parts[n]], 0)) for n in order}
    exact = max((factors[n][0].shape[1] for n in order), default=0)
    result.exact_rank = exact
    if rank is not None and rank > exact:
        raise InvalidRequest(f"rank: {rank} is above the exact rank of these edits ({exact}); leave it out for "
                             "the exact adapter", 400)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in order:
        left, right = (t.detach().to("cpu", torch.float64) for t in factors[name])
        if rank is not None:
            dense = left @ right
            left, right = (t.to(torch.float32).double() for t in truncate(left, right, rank))  # as stored
            # measured on the factors as written, not predicted from the discarded singular values
            norm = float(dense.norm())
            result.errors[name] = float((dense - left @ right).norm()) / norm if norm > 0 else 0.0
        pairs[name] = (left, right)
    r = max((p[0].shape[1] for p in pairs.values()), default=0) or 1
    result.rank = r
    tensors: dict[str, torch.Tensor] = {}
    for name, (left, right) in pairs.items():
        pad = r - left.shape[1]  # zero columns of B and rows of A: B A is unchanged
        b = torch.cat([left, left.new_zeros(left.shape[0], pad)], 1)
        a = torch.cat([right, right.new_zeros(pad, right.shape[1])], 0)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.float32).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.float32).contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,  # scaling α/r = 1: W + B A
        "target_modules": order, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
        "inference_mode": True, "base_model_name_or_path": str(getattr(engine.model, "name_or_path", "") or ""),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    metadata = {"format": "pt", "hiedit_edits": json.dumps(result.edits), "hiedit_model": engine.model_name,
                "hiedit_base_fingerprint": engine.base_fingerprint,
                "hiedit_relative_errors": json.dumps(result.errors)}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata=metadata)


def truncate(left: torch.Tensor, right: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r factors of L R (Eckart-Young), without forming L R.

    With L = Q_L R_L and Rᵀ = Q_R R_R (reduced QR), L R = Q_L (R_L R_Rᵀ) Q_Rᵀ; the SVD of the small
    middle M = U S Vᵀ gives L R = (Q_L U) S (Q_R V)ᵀ, cut to its top r singular values and split as
    B = Q_L U_r S_r^½ [d_out, r], A = S_r^½ V_rᵀ Q_Rᵀ [r, d_in].
    """
    q_l, r_l = torch.linalg.qr(left)
    q_r, r_r = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_l @ r_r.T)
    root = s[:r].sqrt()
    return (q_l @ u[:, :r]) * root, root[:, None] * (vh[:r] @ q_r.T)
