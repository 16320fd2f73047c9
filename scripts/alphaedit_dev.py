"""AlphaEdit's two settings on a real model, on the development stream (never the evaluation stream).

    python scripts/alphaedit_dev.py                       # SmolLM2-135M-Instruct, 8 facts of counterfact-val.json
    python scripts/alphaedit_dev.py --model gemma-3-270m --n 8

Prints, per edited down_proj layer, the spectrum of the preserved keys' second moment Σ̂ (λ_max, its
trace, and how many eigenvalues lie below 10%, 1%, 0.1% of λ_max: the null-space dimension AlphaEdit
would keep at that threshold), and how much of the N facts' keys lies in that null space (the mean of
‖P k‖² / ‖k‖² on the unedited model, beside dim / d_k, what a random direction would give, and
tr(P Σ̂) / tr Σ̂, the preserved keys' share of it): AlphaEdit's
update is P Kᵀ R, so a key with little energy there needs a large ΔW to move its value. Then (unless
--no-edits) it edits the N facts one after another for each (null_rel, l2_rel) setting and prints the target
loss of each fact before and after its edit. The last line is JSON. The statistics come from RLSEdit's cache
(collected on first use, a few minutes).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from editor_core.alphaedit import AlphaEditor, AlphaEditParams, null_space_projector
from editor_core.capture import target_loss, teacher_forced
from editor_core.catalog import resolve_model
from editor_core.data import SHARED_DATA, load_records
from editor_core.evaluate import request_for
from editor_core.model import load_model
from editor_core.rlsedit import RLSEditConfig
from editor_core.state import WeightState
from editor_core.subject import find_subject


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--home", default=str(Path.home() / ".cache" / "hiedit-test"),
                    help="where the converted model lives (catalog.resolve_model)")
    ap.add_argument("--data", default=str(SHARED_DATA / "counterfact" / "counterfact-val.json"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--settings", default="0.01:1.0,0.01:0.1,0.03:1.0", help="null_rel:l2_rel,...")
    ap.add_argument("--stats-cache", default=None, help="RLSEdit statistics cache directory")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-edits", action="store_true", help="the spectra and the keys' null-space energy only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(resolve_model(args.model, Path(args.home)))
    editor = AlphaEditor.create(model, tok, cfg=RLSEditConfig(cache_dir=args.stats_cache))
    spectra = {}
    for name in editor.modules:
        ev = torch.linalg.eigvalsh(editor.sigma[name].double())
        top = float(ev.max())
        spectra[name] = {"lambda_max": top, "trace": float(ev.sum()),
                         "below": {r: int((ev < float(r) * top).sum()) for r in ("0.1", "0.01", "0.001")}}
        print(name, json.dumps(spectra[name]), flush=True)
    records = load_records(args.data, tokenizer=tok, limit=args.n).records
    settings = [tuple(float(x) for x in setting.split(":")) for setting in args.settings.split(",")]
    energy = key_energy(editor, records, sorted({null_rel for null_rel, _ in settings}))
    for null_rel, layers in energy.items():
        print(f"null_rel {null_rel}: keys' energy in the null space (mean over {len(records)} facts), "
              "against dim/d_k:", json.dumps(layers), flush=True)
    runs = {}
    for null_rel, l2_rel in ([] if args.no_edits else settings):
        setting = f"{null_rel:g}:{l2_rel:g}"
        editor.history.clear()
        editor.configure(AlphaEditParams(null_rel, l2_rel))
        state = WeightState(editor.module_map, "dev")
        rows, t0 = [], time.time()
        for i, rec in enumerate(records):
            example = teacher_forced(tok, rec.prompt, rec.target_new)
            proposal = editor.propose(request_for(rec))
            state.apply(i + 1, proposal.delta)
            editor.commit(i + 1, proposal)
            with torch.no_grad():
                after = float(target_loss(model(input_ids=example.input_ids).logits, example.labels))
            rows.append({"loss_before": round(proposal.loss_before, 3), "loss_after": round(after, 3),
                         "delivered": round(proposal.info["delivered"], 3)})
            print(setting, i, rows[-1], flush=True)
        # every fact again at the end: what the later edits left of the earlier ones
        with torch.no_grad():
            end = [float(target_loss(model(input_ids=teacher_forced(tok, r.prompt, r.target_new).input_ids).logits,
                                     teacher_forced(tok, r.prompt, r.target_new).labels)) for r in records]
        state.reset()
        runs[setting] = {"null_dim": list(editor.null_dim.values()), "edits": rows,
                         "mean_loss_before": sum(r["loss_before"] for r in rows) / len(rows),
                         "mean_loss_after_own_edit": sum(r["loss_after"] for r in rows) / len(rows),
                         "mean_loss_at_end": sum(end) / len(end), "s_per_edit": (time.time() - t0) / len(rows)}
        print(setting, json.dumps({k: v for k, v in runs[setting].items() if k != "edits"}), flush=True)
    print(json.dumps({"model": args.model, "data": args.data, "n": len(records), "spectra": spectra,
                      "key_energy": energy, "runs": runs}))


def key_energy(editor: AlphaEditor, records, null_rels: list[float]) -> dict:
    """{null_rel: {module: {"energy": mean ‖P k‖²/‖k‖² over the records' keys, "dim_fraction": dim/d_k,
    "preserved_energy": tr(P Σ̂)/tr Σ̂, the preserved keys' share of the same space}}}, keys as the editor
    computes them (MEMIT's, on the unedited model)."""
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in editor.modules}
    for rec in records:
        subject = find_subject(rec.prompt, rec.subject or None)
        rows, idx = [], []
        for ctx in editor.contexts:
            ids, i = editor._fact_index(ctx + rec.prompt, len(ctx) + subject.end)
            rows.append(ids)
            idx.append(i)
        for name in editor.modules:
            keys[name].append(editor._keys_and_state(name, rows, idx, {})[0][0].double())
    out = {}
    for null_rel in null_rels:
        layers = {}
        for name in editor.modules:
            P, dim = null_space_projector(editor.sigma[name], null_rel)
            k = torch.stack(keys[name])                                          # [N, d_k]
            frac = (k @ P).pow(2).sum(-1) / k.pow(2).sum(-1)                     # ‖P k‖² / ‖k‖² (P symmetric, idempotent)
            sigma = editor.sigma[name].double()
            layers[name] = {"energy": round(float(frac.mean()), 4), "dim_fraction": round(dim / k.shape[1], 4),
                            "preserved_energy": round(float(torch.trace(P @ sigma) / torch.trace(sigma)), 4)}
        out[f"{null_rel:g}"] = layers
    return out


if __name__ == "__main__":
    main()
