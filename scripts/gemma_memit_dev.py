"""MEMIT's settings on Gemma-3 (post-FFN norm), on the development stream (never the evaluation stream).

    python scripts/gemma_memit_dev.py                 # Gemma-3-270M, 8 facts of counterfact-val.json, ~10 min

Reproduces the table of docs/models.md (RLSEdit (and MEMIT, AlphaEdit) on Gemma-3). Prints, per edited
down_proj layer, the post-FFN norm's gains g (how many within 0.05 of zero, min, median |g|) and, at one
fact's subject token, ‖o‖ (the normalised MLP output) and ‖h‖ (the residual); then, for each (damping,
z lr scale) setting, RLSEdit's edit of each fact from the unedited model (one at a time, rolled back) and
the mean NLL of the new object on the edit prompt and on its paraphrase, and of the true object on the
neighbourhood prompt, and the ‖ΔW‖ per layer of the first fact. Damping "none" is the code before 6 Dec
(Δy = rms · r / g, |g| clamped at 1e-3); a number D is the damped preimage with ε = (D · median |g|)²
(``editor_core.memit.MemitEditor._to_down_space`` uses D = 1). The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from editor_core import memit
from editor_core.capture import target_loss, teacher_forced
from editor_core.catalog import resolve_model
from editor_core.data import SHARED_DATA
from editor_core.editor import EditRequest
from editor_core.model import decoder_layers, load_model, model_id
from editor_core.rlsedit import RLSEditor
from editor_core.state import WeightState

SETTINGS = [("none", 0.5), (1.0, 0.5), (0.1, 0.05), (0.3, 0.05), (0.5, 0.05), (1.0, 0.05), (1.0, 0.1), (3.0, 0.05)]


def to_down_space(damping):
    """MemitEditor._to_down_space with another damping ("none": the undamped division of the old code)."""
    def fn(self, name, r, y):
        norm = decoder_layers(self.model)[self.layer_of[name]].post_feedforward_layernorm
        y64, r64 = y.double(), r.double()
        g = norm.weight.detach().double() + 1.0
        rms = (y64.pow(2).mean() + norm.eps).sqrt()
        if damping == "none":
            g = torch.where(g.abs() < 1e-3, torch.full_like(g, 1e-3).copysign(g), g)
            return (rms * r64 / g).float()
        eps = (damping * float(g.abs().median())) ** 2
        return (rms * r64 * g / (g.pow(2) + eps)).float()
    return fn


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m", help="a catalog name or model directory")
    ap.add_argument("--n", type=int, default=8, help="facts of counterfact-val.json (default 8)")
    ap.add_argument("--stats-tokens", type=int, default=5000, help="RLSEdit statistics tokens (default 5000)")
    ap.add_argument("--cache-dir", default=None, help="statistics cache (default RLSEdit's)")
    ap.add_argument("--home", default=None, help="where converted models live (default: the service's HIEDIT_HOME)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from service.settings import default_home

    model, tok = load_model(resolve_model(args.model, Path(args.home) if args.home else default_home()))
    recs = json.loads((SHARED_DATA / "counterfact" / "counterfact-val.json").read_text())[:args.n]

    def nll(prompt, target):
        ex = teacher_forced(tok, prompt, target, 64, 16)
        with torch.no_grad():
            return float(target_loss(model(input_ids=ex.input_ids, use_cache=False).logits, ex.labels))

    original = memit.MemitEditor._to_down_space
    result = {"layers": {}, "settings": []}
    probe = RLSEditor.create(model, tok, stats_max_tokens=args.stats_tokens, cache_dir=args.cache_dir)
    ids = tok(recs[0]["prompt"], return_tensors="pt").input_ids
    _, pos = probe._fact_index(recs[0]["prompt"], recs[0]["prompt"].find(recs[0]["subject"]) + len(recs[0]["subject"]))
    outs, hooks = {}, []
    for name in probe.modules:
        layer = decoder_layers(model)[probe.layer_of[name]]
        hooks.append(layer.post_feedforward_layernorm.register_forward_hook(
            lambda m, a, o, n=name: outs.__setitem__(n, float(o[0, pos].norm()))))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    for name in probe.modules:
        g = decoder_layers(model)[probe.layer_of[name]].post_feedforward_layernorm.weight.detach().double() + 1.0
        row = {"near_zero": int((g.abs() < 0.05).sum()), "d": g.numel(), "min_abs": float(g.abs().min()),
               "median_abs": float(g.abs().median()), "o_norm": outs[name],
               "h_norm": float(hidden[probe.layer_of[name] + 1][0, pos].norm())}
        result["layers"][name] = row
        print(name, row, flush=True)
    try:
        for damping, lr in SETTINGS:
            memit.MemitEditor._to_down_space = to_down_space(damping)
            editor = RLSEditor.create(model, tok, stats_max_tokens=args.stats_tokens, cache_dir=args.cache_dir,
                                      v_lr_scale=lr)
            rows = []
            for r in recs:
                state = WeightState({n: model.get_submodule(n) for n in editor.modules}, model_id(model))
                before = (nll(r["prompt"], r["target_new"]), nll(r["rephrase_prompt"], r["target_new"]),
                          nll(r["locality_prompt"], r["locality_ground_truth"]))
                p = editor.propose(EditRequest(r["prompt"], r["target_new"], subject=r["subject"]))
                state.apply(1, p.delta)
                after = (nll(r["prompt"], r["target_new"]), nll(r["rephrase_prompt"], r["target_new"]),
                         nll(r["locality_prompt"], r["locality_ground_truth"]))
                state.rollback(1)
                rows.append((before, after, p.info["delta_norms"]))
            mean = lambda i, j: statistics.mean(x[i][j] for x in rows)  # noqa: E731
            out = {"damping": damping, "v_lr_scale": lr,
                   "before": [round(mean(0, j), 2) for j in range(3)], "after": [round(mean(1, j), 2) for j in range(3)],
                   "delta_norms_fact0": [round(x, 2) for x in rows[0][2]]}
            result["settings"].append(out)
            print(out, flush=True)
    finally:
        memit.MemitEditor._to_down_space = original
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
