"""The hierarchical-RL trainer: router gradients, accumulation, learning, resume, refusals."""
from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from pathlib import Path

import pytest
import torch

from editor_core.capture import capture
from editor_core.data import EditRecord
from editor_core.hiedit import CheckpointMismatch, HiEditor
from editor_core.model import load_model
from editor_core.state import WeightState
from editor_core.tensors import logits_at
from editor_core.tiny import build_tiny_model
from editor_core.efficacy import single_edit_efficacy
from editor_core.train import BLOCK_PARAMS, Trainer, TrainConfig, TrainConfigError, train_editor
from editor_core.train_data import BadRecord, tokenize_records
from editor_core.train_io import TRAINER_STATE_FILE

SPEC = "gate[0-1],up[0-1]"  # L = 4 modules
SMALL = dict(rank=16, router_hidden=16, n_blocks=1)

SUBJECTS = ["Paris", "Rome", "Berlin", "Madrid", "Tokyo", "London", "Cairo", "Lima", "Oslo", "Delhi",
            "Dublin", "Vienna"]
OBJECTS = ["France", "Italy", "Germany", "Spain", "Japan", "England", "Egypt", "Peru", "Norway", "India",
           "Ireland", "Austria"]


def _records(n: int = 12) -> list[EditRecord]:
    out = []
    for i in range(n):
        s, o, wrong = SUBJECTS[i % 12], OBJECTS[i % 12], OBJECTS[(i + 5) % 12]
        out.append(EditRecord(case_id=str(i), prompt=f"{s} is the capital of", target_new=wrong, target_true=o,
                              rephrase=f"{s} is the capital of", locality_prompt=f"{SUBJECTS[(i + 3) % 12]} is in",
                              locality_target=OBJECTS[(i + 3) % 12], subject=s))
    return out


@functools.lru_cache(maxsize=None)
def _model_dir(seed: int = 0) -> Path:
    texts = [f"{s} is the capital of {o}. {s} is in {o}." for s, o in zip(SUBJECTS, OBJECTS)]
    out = Path(tempfile.mkdtemp(prefix=f"hiedit-train-{seed}-"))
    return build_tiny_model(out, arch="llama", seed=seed, texts=texts, vocab_size=300, hidden=32, layers=2,
                            intermediate=64, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_model(_model_dir())


def _trainer(model, tok, cfg: TrainConfig, k: int = 2, seed: int = 0, records=None) -> Trainer:
    editor = HiEditor.create(model, tok, SPEC, k=k, seed=seed, lr_init=cfg.lr_init or 1e-2, **SMALL)
    examples, _ = tokenize_records(tok, records or _records(), 64, 8)
    return Trainer(editor, examples, cfg, k)


def _grads(params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]


def test_router_gradient_is_the_true_derivative_of_the_task_loss(tiny):
    """∂L/∂m_l from the low-rank surrogate equals a finite difference of the real loss, reg off."""
    model, tok = tiny
    cfg = TrainConfig(reg_coef=0.0, edit_coef=0.0, lr_init=0.3, update_norms=False, **SMALL)
    tr = _trainer(model, tok, cfg)
    for i in (0, 1):  # a second step: θ_{t-1} already carries edit 0, and the window has two facts
        tr.zero_grad()
        if i == 1:
            before = {n: m.weight.detach().clone() for n, m in tr.module_map.items()}
        stats = tr.edit_step(i)
    # The gate bias enters p additively, so its gradient is ∂S/∂p = ∂S/∂m (STE identity).
    g_m = tr.net.router.gate.bias.grad.detach().clone()
    assert g_m.abs().sum() > 0

    # Recompute the step by hand at θ_1 with dense deltas: L(m) = task loss at θ_1 + Σ_l m_l ΔW_l.
    sel_applied = {n: m.weight.detach().clone() for n, m in tr.module_map.items()}
    for n, m in tr.module_map.items():
        m.weight.data = before[n].clone()
    ex = tr.examples[1]
    cap = capture(model, tr.module_map, ex.edit, cfg.tokens)
    keys = [cap.keys[n] for n in tr.modules]
    grads = [cap.grads[n] for n in tr.modules]
    with torch.no_grad():
        dense = [tr.net.factors(l, keys[l], grads[l]) for l in range(tr.L)]
        dense = [left @ right for left, right in dense]
    mask = torch.zeros(tr.L)
    mask[stats.selected] = 1.0
    for n, l in zip(tr.modules, range(tr.L)):  # the step's own θ_1 is what we rebuild
        assert torch.allclose(before[n] + mask[l] * dense[l], sel_applied[n], atol=1e-6)
    # Written out independently of the trainer: per example, full logits, no padding.
    decay = [1.0, cfg.time_decay]                # edit 1 (j = 0), edit 0 (j = 1)
    reph = [tr.examples[i].rephrase for i in (1, 0)]
    locs = [tr.examples[i].loc for i in (1, 0)]

    def logits(ex):
        pos = ex.labels[0] != -100
        return model(input_ids=ex.input_ids).logits[0, pos].float(), ex.labels[0, pos]

    with torch.no_grad():
        for n, mod in tr.module_map.items():
            mod.weight.data = before[n].clone()
        ref = [logits(ex)[0].log_softmax(-1) for ex in locs]   # at θ_{t-1}

    def loss(m: torch.Tensor) -> float:
        for l, (n, mod) in enumerate(tr.module_map.items()):
            mod.weight.data = before[n] + m[l] * dense[l]
        total = 0.0
        with torch.no_grad():
            for j in range(2):
                lg, lab = logits(reph[j])
                total += decay[j] * float(torch.nn.functional.cross_entropy(lg, lab))
                lp = logits(locs[j])[0].log_softmax(-1)
                total += cfg.loc_coef * decay[j] * float((ref[j].exp() * (ref[j] - lp)).sum(-1).mean())
        return total

    eps = 1e-2
    for l in range(tr.L):
        e = torch.zeros(tr.L)
        e[l] = eps
        fd = (loss(mask + e) - loss(mask - e)) / (2 * eps)
        assert fd == pytest.approx(float(g_m[l]), rel=0.03, abs=5e-5), (l, fd, float(g_m[l]))
    for n, mod in tr.module_map.items():
        mod.weight.data = before[n]
    tr.end()


def _trajectory_grads(model, tok, cfg: TrainConfig, indices=(0, 1, 2)):
    """One trajectory without an optimiser step: (modules chosen per edit, router grads, low-level grads),
    the grads by parameter name, zeros where a parameter got none."""
    tr = _trainer(model, tok, cfg)
    picks = [s.selected for s in tr.run_trajectory(list(indices), step=False)]
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in tr.net.named_parameters()}
    tr.end()
    router = {n: g for n, g in grads.items() if n.startswith("router.")}
    return picks, router, {n: g for n, g in grads.items() if n not in router}


def test_router_learns_from_task_losses_not_only_the_l2_term(tiny):
    """With λ = 0 the router still gets gradient (the published code would give it none: its router learns
    from the L2 term alone, reference §5.4), and unselected modules get gradient too, which the L2 term can
    never give them."""
    model, tok = tiny
    runs = {reg: _trajectory_grads(model, tok, TrainConfig(reg_coef=reg, **SMALL)) for reg in (0.0, 1.0)}
    picks, router, low = runs[0.0]
    bias = router["router.gate.bias"]
    unselected = [l for l in range(len(bias)) if l not in picks[-1]]
    assert bias.abs().sum() > 0
    assert not torch.allclose(bias, runs[1.0][1]["router.gate.bias"])
    assert all(bias[l] != 0 for l in unselected)
    assert any(g.abs().sum() > 0 for n, g in router.items() if n.startswith("router.encoders."))
    assert any(g.abs().sum() > 0 for g in low.values())


def test_a_checkpoint_with_a_removed_option_resumes_only_if_it_was_off(tiny, tmp_path):
    """Checkpoints written before the experiment options were removed: off (their default) resumes, on is
    refused with the option named."""
    from editor_core.train import REMOVED_OPTIONS, train_editor

    model, tok = tiny
    cfg = TrainConfig(traj_len=2, trajectories=1, epochs=1, lr_init=1e-2, **SMALL)
    records = _records()[:4]
    train_editor(model, tok, SPEC, 2, records, tmp_path / "ed", cfg=cfg, progress=False)
    state_path = tmp_path / "ed" / TRAINER_STATE_FILE
    state = torch.load(state_path, weights_only=False)
    state["cfg"].update(REMOVED_OPTIONS)
    torch.save(state, state_path)
    again = TrainConfig(traj_len=2, trajectories=1, epochs=2, lr_init=1e-2, **SMALL)
    train_editor(model, tok, SPEC, 2, records, tmp_path / "ed", cfg=again, progress=False, resume=True)
    state = torch.load(state_path, weights_only=False)
    state["cfg"]["balance_coef"] = 0.1
    torch.save(state, state_path)
    with pytest.raises(TrainConfigError, match="balance_coef"):
        train_editor(model, tok, SPEC, 2, records, tmp_path / "ed", cfg=TrainConfig(
            traj_len=2, trajectories=1, epochs=3, lr_init=1e-2, **SMALL), progress=False, resume=True)


def test_low_level_gradients_accumulate_over_the_trajectory(tiny):
    """Grad after steps 1+2 = grad of step 1 + grad of step 2 (the MEND-style code kept only step 2's)."""
    model, tok = tiny
    cfg = TrainConfig(**SMALL)
    tr = _trainer(model, tok, cfg)
    tr.begin_trajectory()
    tr.edit_step(0)
    g1 = _grads(tr.low_params)
    tr.zero_grad()
    tr.edit_step(1)
    g2 = _grads(tr.low_params)
    tr.end()

    tr2 = _trainer(model, tok, cfg)  # same seed: same nets
    tr2.run_trajectory([0, 1], step=False)
    g12 = _grads(tr2.low_params)
    assert sum(float(x.abs().sum()) for x in g1) > 0 and sum(float(x.abs().sum()) for x in g2) > 0
    for a, b, c in zip(g1, g2, g12):
        torch.testing.assert_close(c, a + b, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(c, b) for b, c in zip(g2, g12))


def test_every_editor_block_parameter_learns_from_the_first_step(tiny):
    """B, b and s start where ReLU's subgradient is 0 (h A B + b = 0); they must still get a gradient.

    With torch.relu instead of clamp(min=0) they never did, and the low-level nets stayed the
    identity through any amount of training (only offsets and η moved).
    """
    model, tok = tiny
    tr = _trainer(model, tok, TrainConfig(block_lr=None, **SMALL))
    tr.run_trajectory([0, 1, 2], step=False)
    for name, p in tr.net.nets.named_parameters():
        # ∂/∂A = hᵀ (g Bᵀ) and ∂/∂s = clamp(h A B + b, 0) are 0 while B = b = 0: they learn from the second update
        if not name.endswith((".A", ".scale.weight")):
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    tr.optimizer_step()
    assert all(float(p.detach().abs().sum()) > 0 for n, p in tr.net.nets.named_parameters() if n.endswith(".B"))
    tr.run_trajectory([3, 4, 5], step=False)
    for name, p in tr.net.nets.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    tr.end()


def test_block_lr_zero_keeps_the_blocks_at_identity_and_trains_the_rest(tiny):
    """block_lr = 0 (the default): A, B, b, s take no gradient and do not move; offsets, η and the router do."""
    model, tok = tiny
    tr = _trainer(model, tok, TrainConfig(meta_lr=1e-2, **SMALL))
    before = {n: p.detach().clone() for n, p in tr.net.named_parameters()}
    tr.run_trajectory([0, 1, 2], step=True)
    for n, p in tr.net.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        if n.startswith("nets.") and n.endswith(BLOCK_PARAMS):
            assert not moved and p.grad is None, n
        elif n.endswith(("offset.weight", "lr.weight")) or n.startswith("router."):
            assert moved, n
    tr.end()
    assert all(p.requires_grad for p in tr.net.parameters())
    with pytest.raises(TrainConfigError, match="block_lr"):
        TrainConfig(block_lr=-1.0).validate()


def test_training_lowers_rephrase_ce_on_the_training_stream(tiny):
    model, tok = tiny
    cfg = TrainConfig(traj_len=6, trajectories=2, epochs=3, lr_init=1e-3, meta_lr=1e-3, eta_lr=3e-3, **SMALL)
    order = list(range(12))

    def stream_ce(editor) -> float:
        tr = Trainer(editor, tokenize_records(tok, _records(), 64, 8)[0], TrainConfig(update_norms=False, **SMALL), 2)
        stats = tr.run_trajectory(order[:6], step=False)
        tr.end()
        return sum(s.ce for s in stats) / len(stats)

    untrained = HiEditor.create(model, tok, SPEC, k=2, seed=0, lr_init=cfg.lr_init, **SMALL)
    # give the untrained editor the normaliser statistics training would give it
    trained = train_editor(model, tok, SPEC, 2, _records(), None, seed=0, cfg=cfg, progress=False)
    untrained.net.load_state_dict({**untrained.net.state_dict(),
                                   **{k: v for k, v in trained.net.state_dict().items() if ".norm" in k
                                      or "norms." in k}})
    before, after = stream_ce(untrained), stream_ce(trained)
    assert after < before - 0.1, (before, after)


def test_resume_gives_the_uninterrupted_result(tiny, tmp_path):
    model, tok = tiny
    cfg = TrainConfig(traj_len=3, trajectories=2, epochs=2, lr_init=1e-2, **SMALL)
    full = train_editor(model, tok, SPEC, 2, _records(), tmp_path / "a", seed=3, cfg=cfg, progress=False)

    part = TrainConfig(**{**cfg.as_dict(), "stop_after": 3})
    train_editor(model, tok, SPEC, 2, _records(), tmp_path / "b", seed=3, cfg=part, progress=False)
    state = torch.load(tmp_path / "b" / TRAINER_STATE_FILE, weights_only=False)
    assert (state["epoch"], state["traj"]) == (1, 1)
    resumed = train_editor(model, tok, SPEC, 2, _records(), tmp_path / "b", seed=3, cfg=cfg, progress=False,
                           resume=True)
    a, b = full.net.state_dict(), resumed.net.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the saved editor is what was returned, and it loads for this model
    loaded = HiEditor.load(tmp_path / "b", model, tok)
    assert all(torch.equal(v, b[k]) for k, v in loaded.net.state_dict().items())
    assert loaded.method == "hiedit"
    import json
    log = json.loads((tmp_path / "b" / "train.json").read_text())
    assert log["done"] and log["seed"] == 3 and len(log["history"]) == 4


def test_training_hands_back_the_base_weights(tiny):
    model, tok = tiny
    editor = HiEditor.create(model, tok, SPEC, k=2, **SMALL)
    before = WeightState(editor.module_map, "m").fingerprint()
    train_editor(model, tok, SPEC, 4, _records(), None, cfg=TrainConfig(traj_len=4, trajectories=1, **SMALL),
                 progress=False)
    assert WeightState(editor.module_map, "m").fingerprint() == before


def test_per_edit_mode_steps_after_every_edit(tiny):
    model, tok = tiny
    cfg = TrainConfig(traj_len=4, trajectories=1, update="per_edit", **SMALL)
    tr = _trainer(model, tok, cfg, k=4)
    tr.run_trajectory([0, 1, 2, 3])
    steps = {int(s["step"]) for s in tr.opt_low.state_dict()["state"].values()}
    assert steps == {4}
    cfg = TrainConfig(traj_len=4, trajectories=1, **SMALL)
    tr = _trainer(model, tok, cfg, k=4)
    tr.run_trajectory([0, 1, 2, 3])
    assert {int(s["step"]) for s in tr.opt_low.state_dict()["state"].values()} == {1}
    editor = train_editor(model, tok, SPEC, 4, _records(), None, cfg=TrainConfig(traj_len=4, trajectories=1,
                          update="per_edit", **SMALL), progress=False)
    assert editor.method == "mend"


def test_resume_refuses_another_layer_spec_k_model_or_schedule(tiny, tmp_path):
    model, tok = tiny
    cfg = TrainConfig(traj_len=3, trajectories=1, **SMALL)
    train_editor(model, tok, SPEC, 2, _records(), tmp_path, cfg=cfg, progress=False)
    with pytest.raises(CheckpointMismatch, match="layers"):
        train_editor(model, tok, "gate[0-1]", 1, _records(), tmp_path, cfg=cfg, progress=False, resume=True)
    with pytest.raises(CheckpointMismatch, match="--k"):
        train_editor(model, tok, SPEC, 3, _records(), tmp_path, cfg=cfg, progress=False, resume=True)
    with pytest.raises(TrainConfigError, match="traj_len"):
        train_editor(model, tok, SPEC, 2, _records(), tmp_path,
                     cfg=TrainConfig(**{**cfg.as_dict(), "traj_len": 4}), progress=False, resume=True)
    other, other_tok = load_model(_model_dir(seed=1))
    with pytest.raises(CheckpointMismatch, match="trained for base model"):
        train_editor(other, other_tok, SPEC, 2, _records(), tmp_path, cfg=cfg, progress=False, resume=True)
    with pytest.raises(CheckpointMismatch):
        HiEditor.load(tmp_path, other, other_tok)


def test_bad_records_and_options_are_named(tiny):
    model, tok = tiny
    records = _records()
    bad = EditRecord("x", "Paris is in", "  ", "France", "", "", "")
    with pytest.raises(BadRecord, match=r"record 3 \(case_id x\): field target_new"):
        tokenize_records(tok, records[:3] + [bad], 64, 8)
    examples, skipped = tokenize_records(tok, records[:3] + [bad], 64, 8, skip_bad=True)
    assert (len(examples), skipped) == (3, 1)
    with pytest.raises(TrainConfigError, match="traj_len"):
        TrainConfig(traj_len=0).validate()
    with pytest.raises(TrainConfigError, match="update"):
        TrainConfig(update="sometimes").validate()
    with pytest.raises(TrainConfigError, match="trajectories"):
        train_editor(model, tok, SPEC, 2, records, None, cfg=TrainConfig(traj_len=5, trajectories=3, **SMALL),
                     progress=False)


def test_single_edit_efficacy_restores_weights(tiny):
    model, tok = tiny
    editor = HiEditor.create(model, tok, SPEC, k=2, lr_init=0.5, **SMALL)
    fp = WeightState(editor.module_map, "m").fingerprint()
    out = single_edit_efficacy(editor, _records()[:3])
    assert out["n"] == 3 and 0 <= out["greedy"] <= 100
    assert WeightState(editor.module_map, "m").fingerprint() == fp


def _write_counterfact(path: Path, records: list[EditRecord]) -> Path:
    import json
    path.write_text(json.dumps([{"case_id": int(r.case_id), "prompt": r.prompt, "target_new": r.target_new,
                                 "subject": r.subject, "ground_truth": r.target_true, "rephrase_prompt": r.rephrase,
                                 "locality_prompt": r.locality_prompt, "locality_ground_truth": r.locality_target}
                                for r in records]))
    return path


def test_cli_trains_resumes_and_refuses(tmp_path, capsys):
    from service.cli import main

    data = _write_counterfact(tmp_path / "cf.json", _records())
    base = ["train", "--model", str(_model_dir()), "--data", str(data), "--layers", SPEC, "--out",
            str(tmp_path / "ed"), "--traj-len", "3", "--trajectories", "2", "--rank", "16",
            "--no-progress", "--threads", "1", "--epochs", "1"]
    assert main(base + ["--stop-after", "1"]) == 0
    state = torch.load(tmp_path / "ed" / TRAINER_STATE_FILE, weights_only=False)
    assert (state["epoch"], state["traj"]) == (0, 1)
    assert main(base + ["--resume", "--eval-data", str(data), "--eval-n", "3"]) == 0
    out = capsys.readouterr().out
    assert '"method": "hiedit"' in out and '"single_edit_efficacy"' in out
    state = torch.load(tmp_path / "ed" / TRAINER_STATE_FILE, weights_only=False)
    assert (state["epoch"], state["traj"]) == (1, 0)

    n = len(_records())
    offset = [a if a != str(tmp_path / "ed") else str(tmp_path / "ed-offset") for a in base]
    assert main(offset + ["--offset", "2", "--limit", str(n - 3), "--stop-after", "1"]) == 0
    assert f'"records": {n - 3}' in capsys.readouterr().out

    # a record over the editor's prompt limit loads, then the trainer leaves it out: the summary counts it
    long = _records()
    long[0] = dataclasses.replace(long[0], prompt=" ".join([long[0].prompt] * 200))
    swap = {str(data): str(_write_counterfact(tmp_path / "long.json", long)),
            str(tmp_path / "ed"): str(tmp_path / "ed-skip")}
    assert main([swap.get(a, a) for a in base] + ["--skip-bad", "--stop-after", "1"]) == 0
    summary = capsys.readouterr().out
    assert f'"records": {n - 1}' in summary and '"skipped": 1' in summary, summary
    with pytest.raises(SystemExit):
        main(base + ["--offset", "-1"])
    assert "--offset: must be >= 0" in capsys.readouterr().err

    other = [a if a != SPEC else "gate[0-1],up[1]" for a in base]
    assert main(other + ["--resume"]) == 2
    assert "--layers" in capsys.readouterr().err

    bad = _write_counterfact(tmp_path / "bad.json", _records()[:4])
    import json
    rows = json.loads(bad.read_text())
    rows[2]["target_new"] = ""
    bad.write_text(json.dumps(rows))
    args = [a if a != str(data) else str(bad) for a in base]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "record 2" in err and "target_new" in err


def test_eta_calibration_picks_a_step_that_lowers_the_one_edit_loss(tiny):
    model, tok = tiny
    tr = _trainer(model, tok, TrainConfig(**SMALL), k=2)
    tr.warm_up_norms(range(12))
    fp = WeightState(tr.module_map, "m").fingerprint()
    grid = [1e-6, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    eta0 = tr.calibrate_eta(range(6), grid)
    assert eta0 in grid and eta0 > 1e-6
    for net in tr.net.nets.values():
        w = net.lr.weight.detach()
        assert float(w.min()) == float(w.max()) == pytest.approx(eta0)
    assert tr.editor.cfg.lr_init == eta0
    assert tr.opt_low.param_groups[1]["lr"] == pytest.approx(0.2 * eta0)
    assert WeightState(tr.module_map, "m").fingerprint() == fp


def test_trains_a_gemma2_model_and_scores_kept_positions_like_full_logits():
    from tiny_models import tiny_model_dir

    model, tok = load_model(tiny_model_dir("gemma2"))
    cfg = TrainConfig(traj_len=3, trajectories=1, lr_init=1e-2, **SMALL)
    tr = _trainer(model, tok, cfg)
    ex = tr.examples[0].rephrase
    keep = ex.labels != -100
    with torch.no_grad():  # soft-capped logits at the kept positions == the full forward's
        torch.testing.assert_close(logits_at(model, ex.input_ids, torch.ones_like(ex.input_ids), keep),
                                   model(input_ids=ex.input_ids).logits[keep].float())
    stats = tr.run_trajectory([0, 1, 2])
    assert len(stats) == 3 and all(math.isfinite(s.ce) and math.isfinite(s.advantage) for s in stats)
    tr.end()


def test_trust_region_bounds_every_edit_and_passes_gradients(tiny):
    """‖ΔW_l‖_F ≤ ρ ‖W_l⁰‖_F for every module and fact, and training still reaches the nets through it."""
    model, tok = tiny
    rho = 1e-4  # far below what an untrained editor proposes, so every delta is scaled down
    editor = HiEditor.create(model, tok, SPEC, k=2, seed=0, lr_init=1e-2, max_delta_rel=rho, **SMALL)
    bounds = [rho * float(m.weight.float().norm()) for m in editor.module_map.values()]
    assert editor.cfg.weight_norms == pytest.approx([b / rho for b in bounds])
    for r in _records()[:4]:
        from editor_core.editor import EditRequest
        prop = editor.propose(EditRequest(r.prompt, r.target_new), k=4)
        for name in prop.delta.modules:
            l = editor.modules.index(name)
            assert prop.delta.frobenius_norm(name) <= bounds[l] * (1 + 1e-4)
            assert prop.delta.frobenius_norm(name) >= bounds[l] * 0.99  # scaled down to the boundary, not zeroed
    examples, _ = tokenize_records(tok, _records(), 64, 8)
    tr = Trainer(editor, examples, TrainConfig(**SMALL), 2)
    editor.net.train()
    tr.run_trajectory([0, 1], step=False)
    assert float(editor.net.nets[next(iter(editor.net.nets))].lr.weight.grad.abs().sum()) > 0
    tr.end()
    with pytest.raises(ValueError, match="max_delta_rel"):
        from editor_core.hiedit import HiEditConfig, HiEditNet
        HiEditNet(HiEditConfig(layer_spec=SPEC, k=2, shapes=editor.cfg.shapes, max_delta_rel=0.1, **SMALL))


def test_train_help_reads_as_a_recipe():
    """The experiment options that lost on the demo bed are gone from `hiedit train` (git history keeps them);
    what is left is the recipe: data, layers, schedule, the paper's loss weights, the editor's few settings."""
    from service.cli import train as train_cli
    import argparse

    parser = argparse.ArgumentParser()
    train_cli.configure(parser)
    flags = {a for action in parser._actions for a in action.option_strings}
    for gone in ("--balance-coef", "--router-reward", "--general-loc", "--general-text", "--no-baseline",
                 "--max-delta-rel", "--edit-coef", "--eta-lr", "--router-lr", "--max-grad-norm", "--lr-init",
                 "--n-blocks", "--router-hidden"):
        assert gone not in flags, gone
    for kept in ("--layers", "--k", "--epochs", "--traj-len", "--back-depth", "--time-decay", "--loc-coef",
                 "--reg-coef", "--block-lr", "--tokens", "--seed", "--resume", "--publish"):
        assert kept in flags, kept

