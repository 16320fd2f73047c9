"""RLSEdit: the Woodbury recursion against closed forms, and the editor on tiny Llama / Gemma-2 models."""
from __future__ import annotations

import copy

import pytest
import torch

from editor_core.capture import target_loss, teacher_forced
from editor_core.editor import EditRequest, Proposal
from editor_core.model import load_model, resolve_modules
from editor_core.rlsedit import (RLSEditConfig, RLSEditor, RLSStateMismatch, SingularSystemError, apply_correction,
                                 check_correction, default_fact_token, default_layer_spec, default_mom2_weight,
                                 initial_inverse, precision_floor, rls_downdate_factor, rls_gain, rls_step)
from editor_core.state import WeightState
from editor_core.stats import StatsMismatch, load_second_moments, read_corpus
from editor_core.subject import SubjectError, find_subject
from conftest import scaled_orthonormal_keys
from tiny_models import TINY, tiny_model_dir

SPEC = "down[1-2]"
ALL_MLP = "gate[0-3],up[0-3],down[0-3]"
# Small and fast: two context prefixes, a few Adam steps, a few thousand statistics tokens. A random
# tiny model's hidden states have norm ~0.2 and near-uniform logits, so z may move further than
# MEMIT's clamp (0.75 ‖h‖) and its ‖δ‖/‖h‖² decay (scale-dependent) would allow.
# w is the paper's, scaled to the tiny models' width: the 3x of the last-token regime was chosen on the
# trained demo model, and on a random model it holds the update back from z.
FAST = dict(n_contexts=2, v_steps=8, v_lr=0.05, v_weight_decay=1e-3, clamp_norm_factor=4.0,
            stats_max_tokens=3000, stats_max_length=64, mom2_weight=default_mom2_weight(TINY["intermediate"]))
# On a random tiny model only the subject's own position reliably carries an edit to the
# next-token logits, so the edited facts end with their subject.
FACT = EditRequest("The native language of Danielle Darrieux", "English", subject="Danielle Darrieux")


def inverse_from_scratch(ed: RLSEditor, committed: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{module: C = (A_0 + Σ_i K_iᵀ K_i)⁻¹ [d_k, d_k] float64}, A_0 = α I + β w Σ̂, from the editor's public
    attributes and the keys of the committed edits (one {module: K [u, d_k]} per edit): what the recursion
    should have reached, without it."""
    out = {}
    for name in ed.modules:
        a = ed.cfg.beta * ed.weight[name] * ed.sigma[name].double()
        a.diagonal().add_(ed.alpha[name])
        for keys in committed:
            if name in keys:
                k = keys[name].double()
                a += k.T @ k
        out[name] = torch.linalg.inv((a + a.T) / 2).to(ed.C[name].device)
    return out


# ---- the recursion on random problems (float64) --------------------------------------------------------

def random_problem(seed: int, d_k: int = 12, d_v: int = 5, n0: int = 40):
    g = torch.Generator().manual_seed(seed)
    k0 = torch.randn(n0, d_k, generator=g, dtype=torch.float64)
    sigma = k0.T @ k0 / n0                                 # Σ̂ = (1/N) K_0ᵀ K_0
    w0 = torch.randn(d_k, d_v, generator=g, dtype=torch.float64)
    batches = [(torch.randn(u, d_k, generator=g, dtype=torch.float64),
                torch.randn(u, d_v, generator=g, dtype=torch.float64)) for u in (1, 3, 2, 1, 4)]
    return sigma, w0, batches


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_recursion_matches_the_batch_closed_form(alpha):
    sigma, w0, batches = random_problem(0)
    beta, w = 0.7, 5.0
    C = initial_inverse(sigma, alpha, beta, w)
    W = w0.clone()
    for t, (k, v) in enumerate(batches, 1):
        W += rls_step(C, k, v - k @ W)                      # E_t = V_t − K_t W*_{t-1}
        # A_t = αI + βwΣ̂ + Σ KᵢᵀKᵢ,  B_t = (αI + βwΣ̂) W_0 + Σ KᵢᵀVᵢ,  W*_t = A_t⁻¹ B_t
        a0 = alpha * torch.eye(12, dtype=torch.float64) + beta * w * sigma
        a = a0 + sum(kk.T @ kk for kk, _ in batches[:t])
        b = a0 @ w0 + sum(kk.T @ vv for kk, vv in batches[:t])
        assert torch.allclose(C, torch.linalg.inv(a), rtol=0, atol=1e-8 * float(torch.linalg.inv(a).abs().max()))
        assert (W - torch.linalg.solve(a, b)).abs().max() < 1e-8


def test_float32_c_is_resymmetrised_and_tracks_float64():
    sigma, _, batches = random_problem(1)
    c64, c32 = initial_inverse(sigma, 0.1, 1.0, 5.0), initial_inverse(sigma, 0.1, 1.0, 5.0, torch.float32)
    for k, _ in batches * 6:
        for C in (c64, c32):
            _, m = rls_gain(C, k)
            apply_correction(C, m, -1.0)
    assert torch.equal(c32, c32.T)
    assert (c32.double() - c64).abs().max() < 1e-4 * c64.abs().max()


def test_alpha_zero_first_step_equals_memit():
    sigma, w0, batches = random_problem(2)
    k, _ = batches[1]                                       # u = 3 keys
    r = torch.randn(3, 5, dtype=torch.float64)               # residuals R [u, d_v]
    lam = 15.0
    C = initial_inverse(sigma, 0.0, 1.0, lam)
    g, _ = rls_gain(C, k)
    rls_delta = (g @ r).T                                   # nn.Linear layout [d_v, d_k]
    # MEMIT (reference §3.5), column keys K_c = Kᵀ [d_k, u]: ΔW = R_c K_cᵀ (λ Σ̂ + K_c K_cᵀ)⁻¹
    memit = r.T @ k @ torch.linalg.inv(lam * sigma + k.T @ k)
    assert (rls_delta - memit).abs().max() < 1e-8


def test_downdate_equals_never_having_seen_the_keys():
    sigma, _, batches = random_problem(3)
    seen, skipped = initial_inverse(sigma, 0.2, 1.0, 5.0), initial_inverse(sigma, 0.2, 1.0, 5.0)
    for i, (k, _) in enumerate(batches):
        apply_correction(seen, rls_gain(seen, k)[1], -1.0)
        if i != 2:
            apply_correction(skipped, rls_gain(skipped, k)[1], -1.0)
    apply_correction(seen, rls_downdate_factor(seen, batches[2][0]), +1.0)
    assert (seen - skipped).abs().max() < 1e-8 * skipped.abs().max()


def test_the_singularity_floor_is_relative_to_the_keys():
    """Six keys with S = I − K C Kᵀ of 10⁻³ each downdate accurately; one key with ‖k‖² = 10⁷, whose S of 10⁻⁷
    is mostly rounding, is refused (an absolute pivot threshold of 10⁻¹⁰ passed it, 4% wrong)."""
    six, one = scaled_orthonormal_keys()
    C0 = torch.eye(six.shape[1], dtype=torch.float64)
    C = C0.clone()
    apply_correction(C, rls_gain(C, six)[1], -1.0)
    apply_correction(C, rls_downdate_factor(C, six), +1.0)
    assert float((C - C0).norm()) <= 1e-8 * float(C0.norm())
    C = C0.clone()
    apply_correction(C, rls_gain(C, one)[1], -1.0)
    with pytest.raises(SingularSystemError, match="singular or indefinite"):
        rls_downdate_factor(C, one)
    # a symmetric C's one-pass floor is the general bound √(‖C‖₁‖C‖∞)
    assert precision_floor(C, one, symmetric=True) == pytest.approx(precision_floor(C, one), rel=1e-12)


def test_non_finite_and_singular_systems_raise_and_change_nothing():
    sigma, _, batches = random_problem(4)
    C = initial_inverse(sigma, 0.1, 1.0, 5.0)
    before = C.clone()
    bad = batches[1][0].clone()
    bad[1, 3] = float("nan")
    with pytest.raises(SingularSystemError, match="NaN"):
        rls_gain(C, bad)
    with pytest.raises(SingularSystemError, match="singular or indefinite"):
        rls_gain(-C, batches[1][0] * 10)                    # C not positive definite
    with pytest.raises(SingularSystemError, match="singular or indefinite"):
        rls_downdate_factor(C, batches[1][0] * 100)         # keys that were never added to A
    with pytest.raises(SingularSystemError, match="overflow"):
        check_correction(C, torch.full((12, 1), 1e200, dtype=torch.float64), "test")
    with pytest.raises(SingularSystemError, match="not positive definite"):
        initial_inverse(torch.zeros(12, 12), 0.0, 1.0, 5.0)
    assert torch.equal(C, before)


def test_default_layer_spec_picks_lower_middle_layers():
    assert default_layer_spec(4) == "down[1-2]"
    assert default_layer_spec(6) == "down[1-2]"
    assert default_layer_spec(32) == "down[4-8]"
    assert default_layer_spec(3) == "down[1-1]"
    assert default_layer_spec(2) == "down[0-0]"                  # a layer above must carry the edit


def test_shallow_models_are_edited_at_the_last_token_in_their_lookup_layers():
    assert [default_fact_token(n) for n in (2, 4, 6, 8)] == ["last"] * 4
    assert [default_fact_token(n) for n in (12, 28, 32)] == ["subject_last"] * 3
    assert default_layer_spec(6, "last") == "down[3]"            # the demo model (causal tracing, docs/rlsedit.md)
    assert default_layer_spec(4, "last") == "down[1]"
    assert default_layer_spec(8, "last") == "down[5]"
    assert default_layer_spec(2, "last") == "down[0]"
    assert default_layer_spec(32, "subject_last") == default_layer_spec(32) == "down[4-8]"
    with pytest.raises(ValueError, match="fact_token"):
        RLSEditConfig(fact_token="first")
    with pytest.raises(ValueError, match="v_lr"):
        RLSEditConfig(v_lr=0.0)


def test_prior_weight_defaults_to_the_papers_w_scaled_to_width_and_3x_at_the_last_token():
    assert default_mom2_weight(14336) == pytest.approx(15000.0)    # Llama-3-8B, the published setting
    assert default_mom2_weight(768) == pytest.approx(15000.0 * 768 / 14336)
    assert default_mom2_weight(768, "last") == pytest.approx(3 * default_mom2_weight(768))


@pytest.mark.parametrize("prompt, subject, text, source", [
    ("The mother tongue of Danielle Darrieux is", None, "Danielle Darrieux", "derived"),
    ("What is the capital of France?", None, "France", "derived"),
    ("The Eiffel Tower is in", None, "Eiffel Tower", "derived"),
    ("the eiffel tower is in", None, "in", "last_token"),
    ("Toko Yasuda plays the", "Toko Yasuda", "Toko Yasuda", "given"),
])
def test_subjects_are_given_derived_or_the_last_token(prompt, subject, text, source):
    s = find_subject(prompt, subject)
    assert (s.text, s.source) == (text, source) and prompt[s.start:s.end] == text


# ---- the editor on a tiny Llama -------------------------------------------------------------------------

def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model, tok = load_model(tiny_model_dir("llama"), "float32")
    cache = tmp_path_factory.mktemp("rls-stats")
    editor = RLSEditor.create(model, tok, layers=SPEC, cfg=RLSEditConfig(cache_dir=str(cache), **FAST))
    state = WeightState(resolve_modules(model, ALL_MLP), "tiny")
    c_before = {n: c.clone() for n, c in editor.C.items()}
    weights_before = snapshot(model)
    proposal = editor.propose(FACT)
    return dict(model=model, tok=tok, editor=editor, state=state, cache=cache, proposal=proposal,
                c_before=c_before, weights_before=weights_before)


def loss_of(model, tok, request: EditRequest) -> float:
    ex = teacher_forced(tok, request.prompt, request.target)
    with torch.no_grad():
        return float(target_loss(model(input_ids=ex.input_ids).logits, ex.labels))


def random_blob(editor: RLSEditor, seed: int, u: int = 1) -> bytes:
    g = torch.Generator().manual_seed(seed)
    keys = {n: torch.randn(u, editor.module_map[n].in_features, generator=g) * 0.05 for n in editor.modules}
    resid = {n: torch.zeros(u, editor.module_map[n].out_features) for n in editor.modules}
    return editor._keys_blob(keys, resid)


def test_auto_fact_token_is_resolved_at_creation(llama):
    assert llama["editor"].cfg.fact_token == "last"              # the tiny Llama has 4 layers
    assert llama["proposal"].info["fact_token"] == "last"


@pytest.mark.parametrize("fact_token", ["subject_last", "last"])
def test_keys_are_the_down_proj_inputs_at_the_fact_token(llama, fact_token):
    """With no context prefixes the key of the first edited layer is its input at the fact token of the prompt."""
    from safetensors.torch import load as st_load
    model, tok = llama["model"], llama["tok"]
    stats = load_second_moments(llama["cache"], model, llama["editor"].modules)
    ed = RLSEditor.create(model, tok, layers=SPEC, stats=stats,
                          cfg=RLSEditConfig(**{**FAST, "n_contexts": 0, "v_steps": 1, "fact_token": fact_token}))
    request = EditRequest("Danielle Darrieux was born in the city of", "Paris", subject="Danielle Darrieux")
    ids = tok(request.prompt, return_tensors="pt")["input_ids"]
    seen = {}

    def grab(_m, args, _out):
        seen["x"] = args[0][0].detach().clone()

    hook = ed.module_map[ed.modules[0]].register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        hook.remove()
    offsets = tok(request.prompt, return_offsets_mapping=True)["offset_mapping"]
    subject_last = max(i for i, (a, b) in enumerate(offsets) if b > a and a < len("Danielle Darrieux"))
    pos = subject_last if fact_token == "subject_last" else ids.shape[1] - 1
    assert subject_last < ids.shape[1] - 1                       # the two positions differ in this prompt
    key = st_load(ed.propose(request).state_blob)["keys.0"][0]
    assert torch.allclose(key, seen["x"][pos], atol=1e-6)
    with pytest.raises(SubjectError):                            # "last" still checks a given subject
        ed.propose(EditRequest(request.prompt, "Paris", subject="Colosseum"))


def test_value_lr_is_relative_to_the_hidden_norm(llama):
    model, tok = llama["model"], llama["tok"]
    stats = load_second_moments(llama["cache"], model, llama["editor"].modules)
    make = lambda **kw: RLSEditor.create(model, tok, layers=SPEC, stats=stats,  # noqa: E731
                                         cfg=RLSEditConfig(**{**FAST, "v_steps": 2, **kw}))
    info = make(v_lr=None, v_lr_scale=0.3).propose(FACT).info
    d_v = model.config.hidden_size
    assert info["v_lr"] == pytest.approx(0.3 * info["h_norm"] / d_v ** 0.5, rel=1e-6)
    assert make(v_lr=0.05).propose(FACT).info["v_lr"] == 0.05    # an absolute lr is taken as given


def test_value_optimisation_stops_on_the_fit_not_on_kl_and_decay(llama):
    """A decay of 100 · ‖δ‖/‖h‖ keeps NLL + KL + decay far above the threshold after the first step;
    the optimisation must still stop as soon as the target NLL is below it."""
    model, tok = llama["model"], llama["tok"]
    stats = load_second_moments(llama["cache"], model, llama["editor"].modules)
    make = lambda **kw: RLSEditor.create(model, tok, layers=SPEC, stats=stats,  # noqa: E731
                                         cfg=RLSEditConfig(**{**FAST, "v_lr": None, "v_lr_scale": 0.05, **kw}))
    nll0 = make(v_steps=1).propose(FACT).info["z_nll"]               # the NLL before any step
    info = make(v_steps=10, v_weight_decay=100.0, early_stop_loss=nll0 - 1e-4).propose(FACT).info
    assert info["z_nll"] < nll0 - 1e-4 and info["z_steps"] < 10, info


def test_propose_changes_neither_the_model_nor_c(llama):
    after = snapshot(llama["model"])
    assert all(torch.equal(after[n], llama["weights_before"][n]) for n in after)
    assert all(torch.equal(llama["editor"].C[n], llama["c_before"][n]) for n in llama["editor"].modules)
    assert llama["editor"].history == {}
    assert not any(m._forward_hooks for m in llama["model"].modules())   # every proposal-time hook is gone


def test_generation_during_a_proposal_never_sees_its_overrides(llama):
    """propose emulates the partly edited model with hooks; another thread sharing the model must not."""
    import threading
    model, tok, editor = llama["model"], llama["tok"], llama["editor"]
    ids = tok(FACT.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = model(input_ids=ids).logits
    done, seen = threading.Event(), []
    worker = threading.Thread(target=lambda: (editor.propose(FACT), done.set()))
    worker.start()
    while not done.is_set():
        with torch.no_grad():
            seen.append(torch.equal(model(input_ids=ids).logits, base))
    worker.join()
    assert seen and all(seen)


def test_edit_raises_the_target_probability_and_touches_only_its_down_projs(llama):
    model, tok, editor, state, p = llama["model"], llama["tok"], llama["editor"], llama["state"], llama["proposal"]
    assert editor.method == "rlsedit"
    assert editor.modules == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert p.modules == editor.modules and p.selected == [0, 1] and p.delta.modules == editor.modules
    assert p.info["subject"] == "Danielle Darrieux" and p.info["subject_source"] == "given"
    assert 0.5 < p.info["delivered"] <= 1.0 + 1e-6               # the spread update closes most of z − h
    assert torch.allclose(p.importances, torch.tensor(p.info["delta_norms"], dtype=torch.float32))
    assert all(p.delta.rank(n) == 1 for n in editor.modules)
    base = state.fingerprint()
    state.apply(1, p.delta)
    try:
        after = loss_of(model, tok, FACT)
        changed = {n for n, w in snapshot(model).items() if not torch.equal(w, llama["weights_before"][n])}
    finally:
        state.rollback(1)
    assert after < p.loss_before - 0.05, (p.loss_before, after)
    assert changed == {n + ".weight" for n in editor.modules}
    assert state.fingerprint() == base == state.base_fingerprint   # the delta round-trips through apply/rollback


def test_delta_factors_are_the_rls_gain_times_the_innovation(llama):
    editor, p = llama["editor"], llama["proposal"]
    from safetensors.torch import load as st_load
    blob = st_load(p.state_blob)
    for i, name in enumerate(editor.modules):
        k, e = blob[f"keys.{i}"].double(), blob[f"innovation.{i}"].double()
        a = editor.cfg.beta * editor.weight[name] * editor.sigma[name].double()
        a += editor.alpha[name] * torch.eye(a.shape[0], dtype=torch.float64) + k.T @ k
        expected = e.T @ (torch.linalg.inv(a) @ k.T).T       # ΔW = Eᵀ (C_1 Kᵀ)ᵀ, nn.Linear layout
        assert torch.allclose(p.delta.dense(name).double(), expected, rtol=1e-4, atol=1e-6 * expected.abs().max())
    # innovation E = R = (z − h)/(L_e − i): the first layer gets half of the residual it saw
    assert p.info["innovation"] == "principled" and p.info["z_layer"] == 2


def test_commit_forget_restore_and_snapshots(llama, tmp_path):
    model, tok, p = llama["model"], llama["tok"], llama["proposal"]
    stats = {n: s for n, s in load_second_moments(llama["cache"], model, llama["editor"].modules).items()}
    cfg = RLSEditConfig(**FAST)
    make = lambda **kw: RLSEditor.create(model, tok, layers=SPEC, cfg=cfg, stats=stats, **kw)  # noqa: E731
    ed, fresh, replay = make(), make(), make()
    c0 = {n: c.clone() for n, c in ed.C.items()}
    blobs = {1: p.state_blob, 2: random_blob(ed, 2, u=3), 3: random_blob(ed, 3)}
    for eid, blob in blobs.items():
        ed.commit(eid, Proposal(ed.modules, torch.zeros(2), [0, 1], p.delta, 0.0, 1, state_blob=blob))
    assert all(not torch.equal(ed.C[n], c0[n]) for n in ed.modules)
    for eid, blob in blobs.items():                        # a restart replays the log
        replay.restore(eid, blob)
    assert all(torch.equal(replay.C[n], ed.C[n]) for n in ed.modules)
    # a server restarted with another layer spec replays the keys of the layers both specs share
    narrow = RLSEditor.create(model, tok, layers="down[2]", cfg=cfg, stats=stats)
    for eid, blob in blobs.items():
        narrow.restore(eid, blob)
    assert torch.equal(narrow.C[ed.modules[1]], ed.C[ed.modules[1]]) and sorted(narrow.history) == [1, 2, 3]
    with pytest.raises(RLSStateMismatch, match="modules"):   # a fresh proposal must be for this editor
        narrow.commit(4, Proposal(ed.modules, torch.zeros(2), [0, 1], p.delta, 0.0, 1, state_blob=blobs[1]))
    path = ed.save_state(tmp_path / "rls.safetensors")
    before = {n: c.clone() for n, c in ed.C.items()}
    with pytest.raises(RLSStateMismatch, match="not the ones committed"):
        ed.forget(2, blobs[3])                             # the log's keys are checked against the digest
    with pytest.raises(RLSStateMismatch, match="not the ones committed"):
        ed.prepare_forget(2, blobs[3])                     # what a rollback asks first
    forget_2 = ed.prepare_forget(2, blobs[2])
    assert all(torch.equal(ed.C[n], before[n]) for n in ed.modules) and sorted(ed.history) == [1, 2, 3]
    forget_2()                                             # rollback of edit 2, its keys read from the log
    ed.forget(99, None)                                    # never committed here: no-op
    for eid in (1, 3):
        fresh.restore(eid, blobs[eid])
    for n in ed.modules:
        assert (ed.C[n] - fresh.C[n]).abs().max() < 1e-8 * fresh.C[n].abs().max()
    assert sorted(ed.history) == [1, 3]
    recursed = {n: c.clone() for n, c in ed.C.items()}
    rebuilt = inverse_from_scratch(ed, [ed.keys_from_blob(blobs[e]) for e in (1, 3)])
    assert all((rebuilt[n] - recursed[n]).abs().max() < 1e-8 * recursed[n].abs().max() for n in ed.modules)
    replay.load_state(path)                                # snapshot + replay of the log is idempotent
    replay.restore(1, blobs[1])
    assert sorted(replay.history) == [1, 2, 3]
    replay.forget(2, blobs[2])
    assert all((replay.C[n] - fresh.C[n]).abs().max() < 1e-8 * fresh.C[n].abs().max() for n in ed.modules)
    other = make(alpha=0.5)
    c_other = {n: c.clone() for n, c in other.C.items()}
    with pytest.raises(RLSStateMismatch, match="alpha"):
        other.load_state(path)
    assert all(torch.equal(other.C[n], c_other[n]) for n in other.modules) and other.history == {}
    with pytest.raises(RLSStateMismatch, match="fact_token"):  # its C holds keys read at another token
        make(fact_token="subject_last").load_state(path)
    with pytest.raises(ValueError, match="already committed"):
        ed.commit(1, Proposal(ed.modules, torch.zeros(2), [0, 1], p.delta, 0.0, 1, state_blob=blobs[1]))
    ed.reset()                                             # the repair when a forget is refused
    assert ed.history == {} and all(torch.equal(ed.C[n], c0[n]) for n in ed.modules)


def test_memit_nohist_keeps_c0_before_every_edit(llama):
    model, tok = llama["model"], llama["tok"]
    stats = load_second_moments(llama["cache"], model, llama["editor"].modules)
    ed = RLSEditor.create(model, tok, layers=SPEC, cfg=RLSEditConfig(reset_every_edit=True, **FAST), stats=stats)
    assert ed.method == "memit-nohist"
    c0 = {n: c.clone() for n, c in ed.C.items()}
    ed.commit(1, llama["proposal"])
    ed.restore(2, random_blob(ed, 5))
    assert all(torch.equal(ed.C[n], c0[n]) for n in ed.modules) and ed.history == {}
    # with the same weights and no history, memit-nohist proposes exactly what rlsedit does first
    again = ed.propose(FACT)
    for n in ed.modules:
        assert torch.allclose(again.delta.dense(n), llama["proposal"].delta.dense(n), rtol=1e-4, atol=1e-7)


def test_reference_innovation_reproduces_the_public_code(llama):
    """innovation="reference": E = (V − K W)/(L_e − i) with V = z − h, vs the principled E = (z − h)/(L_e − i)."""
    from safetensors.torch import load as st_load
    model, tok = llama["model"], llama["tok"]
    stats = load_second_moments(llama["cache"], model, llama["editor"].modules)
    blobs = {}
    for innovation in ("principled", "reference"):
        ed = RLSEditor.create(model, tok, layers=SPEC, stats=stats,
                              cfg=RLSEditConfig(innovation=innovation, **{**FAST, "v_steps": 1}))
        p = ed.propose(FACT)
        assert p.info["innovation"] == innovation
        blobs[innovation] = st_load(p.state_blob)
    name = ed.modules[0]                                   # the first layer sees the unedited model in both
    k = blobs["principled"]["keys.0"]
    assert torch.equal(k, blobs["reference"]["keys.0"])
    w = model.get_submodule(name).weight.detach()
    expected = (2 * blobs["principled"]["innovation.0"] - k @ w.T) / 2
    assert torch.allclose(blobs["reference"]["innovation.0"], expected, atol=1e-6)


def test_bad_input_raises_and_changes_nothing(llama):
    model, editor = llama["model"], llama["editor"]
    weights, c = snapshot(model), {n: t.clone() for n, t in editor.C.items()}
    with pytest.raises(SubjectError, match="subject"):
        editor.propose(EditRequest("The Eiffel Tower is in", "Rome", subject="Colosseum"))
    assert isinstance(SubjectError("x"), ValueError)
    with pytest.raises(ValueError, match="target"):
        editor.propose(EditRequest("The Eiffel Tower is in", "   "))
    with pytest.raises(ValueError, match="^k"):
        editor.propose(FACT, k=1)
    nan_keys = {n: torch.full((1, editor.module_map[n].in_features), float("nan")) for n in editor.modules}
    blob = editor._keys_blob(nan_keys, {n: torch.zeros(1, 48) for n in editor.modules})
    with pytest.raises(SingularSystemError):
        editor.commit(7, Proposal(editor.modules, torch.zeros(2), [0, 1], llama["proposal"].delta, 0.0, 1,
                                  state_blob=blob))
    with pytest.raises(RLSStateMismatch):
        editor.restore(8, b"not a blob at all")
    # a C that is no longer positive definite: the u×u system is refused, nothing changes
    name = editor.modules[1]
    good = editor.C[name]
    editor.C[name] = -1e4 * good
    editor.cfg.v_steps = 1                                  # the value is irrelevant here: keep it cheap
    try:
        with pytest.raises(SingularSystemError):
            editor.propose(FACT)
    finally:
        editor.C[name] = good
        editor.cfg.v_steps = FAST["v_steps"]
    with pytest.raises(ValueError, match="down_proj"):
        RLSEditor.create(model, llama["tok"], layers="gate[1-2]", cfg=RLSEditConfig(**FAST))
    assert all(torch.equal(w, weights[n]) for n, w in snapshot(model).items())
    assert all(torch.equal(editor.C[n], c[n]) for n in editor.modules) and editor.history == {}


def test_singular_a0_is_refused_at_creation(llama):
    zero = {n: torch.zeros(96, 96) for n in llama["editor"].modules}
    with pytest.raises(SingularSystemError, match="alpha > 0"):
        RLSEditor.create(llama["model"], llama["tok"], layers=SPEC, cfg=RLSEditConfig(alpha=0.0, **FAST), stats=zero)


def test_statistics_are_cached_per_model_and_refused_for_another(llama):
    model, tok, cache = llama["model"], llama["tok"], llama["cache"]
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 2 and all(f.with_suffix(".json").is_file() for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = RLSEditor.create(model, tok, layers=SPEC, cfg=RLSEditConfig(cache_dir=str(cache), **FAST))
    assert [f.stat().st_mtime_ns for f in files] == mtimes          # read from the cache, not recollected
    assert all(torch.equal(again.sigma[n], llama["editor"].sigma[n]) for n in again.modules)
    other = copy.deepcopy(model)                                     # "another model": other attention weights
    with torch.no_grad():
        other.model.layers[0].self_attn.o_proj.weight.add_(0.01)
    with pytest.raises(StatsMismatch, match="another model|not on the loaded model"):
        RLSEditor.create(other, tok, layers=SPEC, cfg=RLSEditConfig(**FAST), stats=cache)
    assert len(read_corpus()) > 5000                                  # the default corpus: shared GLUE samples


# ---- Gemma-2 (post-feed-forward norm between down_proj and the residual) -----------------------------------

def test_gemma2_edit_raises_the_target_probability(tmp_path):
    model, tok = load_model(tiny_model_dir("gemma2"), "float32")
    # The default 25 value steps, not FAST's 8: this twin's post-norm gains are all 1, where the damped
    # preimage (memit._to_down_space) writes half of r per layer, and 8 steps then lower the loss by 0.045.
    editor = RLSEditor.create(model, tok, cfg=RLSEditConfig(cache_dir=str(tmp_path),
                                                            **{**FAST, "stats_max_tokens": 1500, "v_steps": 25}))
    assert editor.cfg.fact_token == "last" and editor.modules == ["model.layers.1.mlp.down_proj"]  # 4 layers
    request = EditRequest("the eiffel tower is in", "Rome")           # no subject: falls back to the last token
    p = editor.propose(request)
    assert p.info["subject_source"] == "last_token"
    state = WeightState(resolve_modules(model, editor.cfg.layers), "tiny-gemma")
    state.apply(1, p.delta)
    assert loss_of(model, tok, request) < p.loss_before - 0.05
    state.rollback(1)
    assert state.fingerprint() == state.base_fingerprint


# ---- the demo model: the defaults must edit its facts ---------------------------------------------------

def _demo_built() -> bool:
    from editor_core.assets import DEMO_MODEL, DEMO_SPLIT
    return (DEMO_MODEL / "config.json").is_file() and DEMO_SPLIT.is_file()


@pytest.mark.skipif(not _demo_built(), reason="demo assets not built")
def test_demo_model_default_edits_flip_single_facts(tmp_path):
    """With the default settings one edit makes P(new) > P(true) on the edit prompt for at least 7 of
    8 facts of the demo split's held-out stream (never the benchmark stream). With MEMIT's absolute
    settings (v_lr 0.1, subject-last token) it was 0 of 10 (docs/rlsedit.md)."""
    import json

    from editor_core.assets import DEMO_MODEL, DEMO_SPLIT
    from editor_core.data import SHARED_DATA, load_counterfact
    from editor_core.evaluate import Probe, ProbeSet, request_for

    split = json.loads(DEMO_SPLIT.read_text())
    records = {r.case_id: r for r in load_counterfact(SHARED_DATA / split["data"]).records}
    facts = [records[c] for c in split["streams"]["heldout"][:8]]
    model, tok = load_model(DEMO_MODEL, "float32")
    editor = RLSEditor.create(model, tok, cfg=RLSEditConfig(cache_dir=str(tmp_path)))
    assert editor.cfg.fact_token == "last" and editor.cfg.layers == "down[3]"
    assert editor.weight == {"model.layers.3.mlp.down_proj": pytest.approx(default_mom2_weight(768, "last"))}
    state = WeightState(editor.module_map, "demo")
    probes = ProbeSet(tok, [Probe(r.prompt, r.target_new, r.target_true) for r in facts])
    before = probes.scores(model).new_over_true
    flipped, delivered = [], []
    for i, r in enumerate(facts):
        p = editor.propose(request_for(r))
        state.apply(i + 1, p.delta)
        flipped.append(float(probes.scores(model).new_over_true[i]))
        state.rollback(i + 1)
        delivered.append(p.info["delivered"])
    assert float(before.mean()) == 0.0                          # the model knows every true answer
    assert sum(flipped) >= 7, flipped
    # the update reaches z, less than all the way where the prior (w) holds it back
    assert min(delivered) > 0.7 and sum(delivered) / len(delivered) > 0.8, delivered
    assert state.fingerprint() == state.base_fingerprint


def test_history_bench_reports_its_ratio_and_a_recursion_that_matches_the_batch_form(capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "rlsedit_history.py"
    spec = importlib.util.spec_from_file_location("rlsedit_history", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--edits", "40", "--window", "10", "--d-k", "64", "--d-v", "16", "--demo-edits", "0"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result   # the last line is the JSON
    assert result["ratio_solve_late_to_early"] > 0 and result["target_ratio_max"] == 1.2
    assert result["c_max_rel_err_vs_batch"] < 1e-8 and result["w_max_rel_err_vs_batch"] < 1e-8
