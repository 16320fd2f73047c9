"""The HiEdit engine on tiny Llama and Gemma-2 models: specs, capture, deltas, state, editor."""
from __future__ import annotations

import random

import pytest
import torch
from torch.func import functional_call

from editor_core.capture import EditInputError, capture, target_loss, teacher_forced
from editor_core.delta import LowRankDelta
from editor_core.editor import EditRequest
from editor_core.hiedit import CheckpointMismatch, HiEditor
from editor_core.model import LayerSpecError, load_model, parse_layer_spec, resolve_modules
from editor_core.state import DeltaRejected, WeightState
from tiny_models import tiny_model_dir

SPEC = "gate[1-3],up[1-3]"  # L = 6 modules on a 4-layer model
ALL_MLP = "gate[0-3],up[0-3],down[0-3]"
FACTS = [("The Eiffel Tower is in", "Rome"), ("Danielle Darrieux speaks", "English"),
         ("Toko Yasuda plays the", "piano"), ("The headquarters of BBC is in", "Paris"),
         ("Apple A5 was created by", "Google"), ("Berlin is the capital of", "France"),
         ("Miles Davis plays the", "violin"), ("Toyota is a company from", "Italy")]


def snapshot(model) -> dict[str, bytes]:
    return {n: p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            for n, p in model.state_dict().items()}


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def setup(request):
    model, tok = load_model(tiny_model_dir(request.param), "float32")
    editor = HiEditor.create(model, tok, SPEC, k=3, seed=1, lr_init=1e-2)
    state = WeightState(resolve_modules(model, ALL_MLP), "tiny")
    model.arch = request.param
    return model, tok, editor, state


# ---- layer specs and loading ------------------------------------------------------------------

def test_layer_spec_parses_in_order():
    refs = parse_layer_spec("gate[11-15],up[18-24]", 32)
    assert [r.short for r in refs] == [f"gate{i}" for i in range(11, 16)] + [f"up{i}" for i in range(18, 25)]
    assert refs[0].name == "model.layers.11.mlp.gate_proj"
    assert [r.short for r in parse_layer_spec("down[4]", 8)] == ["down4"]


@pytest.mark.parametrize("spec,words", [
    ("attn[1-2]", "unknown module kind 'attn'"), ("gate[1-9]", "out of range"), ("gate[3-1]", "reversed"),
    ("gate[1-2],gate[2]", "more than once"), ("gate(1)", "not of the form"), ("", "empty")])
def test_layer_spec_errors_name_the_problem(spec, words):
    with pytest.raises(LayerSpecError, match=words.replace("(", r"\(").replace("[", r"\[")):
        parse_layer_spec(spec, 4)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                                ("float32", torch.float32)])
def test_load_model_from_local_dir_in_each_dtype(arch, dtype, torch_dtype):
    model, tok = load_model(tiny_model_dir(arch), dtype)
    assert next(model.parameters()).dtype == torch_dtype
    assert not any(p.requires_grad for p in model.parameters())
    assert len(resolve_modules(model, SPEC)) == 6
    ids = tok("The Eiffel Tower is in", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits.float()).all()


# ---- capture ------------------------------------------------------------------------------------

def test_capture_factors_equal_the_weight_gradient(setup):
    model, tok, editor, _ = setup
    modules = resolve_modules(model, SPEC)
    example = teacher_forced(tok, "The Eiffel Tower is in", "Rome")
    cap = capture(model, modules, example)
    assert cap.n_tokens == example.input_ids.shape[1]
    # Reference: a plain backward with the editable weights requiring grad.
    for m in modules.values():
        m.weight.requires_grad_(True)
    loss = target_loss(model(input_ids=example.input_ids).logits, example.labels)
    loss.backward()
    for name, m in modules.items():
        grad_from_factors = cap.grads[name].T @ cap.keys[name]  # Σ_t δ_t u_tᵀ, [d_out, d_in]
        torch.testing.assert_close(grad_from_factors, m.weight.grad, rtol=1e-4, atol=1e-6)
        m.weight.grad = None
        m.weight.requires_grad_(False)
    assert abs(cap.loss - float(loss.detach())) < 1e-5
    others = [p for n, p in model.named_parameters() if p.grad is not None or p.requires_grad]
    assert others == [], "capture must leave no gradients and no requires_grad behind"


def test_teacher_forcing_adds_one_separating_space(setup):
    _, tok, _, _ = setup
    ex = teacher_forced(tok, "The Eiffel Tower is in", "  Rome ")
    target_ids = tok(" Rome", add_special_tokens=False)["input_ids"]
    assert ex.labels[0, -len(target_ids):].tolist() == target_ids
    assert (ex.labels[0, :-len(target_ids)] == -100).all()
    assert ex.input_ids.shape == ex.labels.shape


# ---- edits: exactly k modules, low rank, routing ----------------------------------------------------

def test_edit_changes_exactly_the_k_selected_modules(setup):
    model, tok, editor, state = setup
    before = snapshot(model)
    proposal = editor.propose(EditRequest("The Eiffel Tower is in", "Rome"))
    assert len(proposal.selected) == 3 and proposal.importances.shape == (6,)
    assert snapshot(model) == before, "propose must not change the model"
    state.apply(1, proposal.delta)
    after = snapshot(model)
    changed = {n.removesuffix(".weight") for n in before if before[n] != after[n]}
    assert changed == set(proposal.selected_modules)
    for name in proposal.selected_modules:
        assert proposal.delta.rank(name) <= proposal.n_tokens
        assert proposal.delta.rank_bound(name) == proposal.n_tokens
    state.reset()
    assert snapshot(model) == before


def test_random_router_picks_different_modules_for_different_facts(setup):
    _, _, editor, _ = setup
    chosen = {tuple(editor.propose(EditRequest(p, t)).selected) for p, t in FACTS}
    assert len(chosen) >= 2


def test_k_override_and_out_of_range(setup):
    _, _, editor, _ = setup
    assert len(editor.propose(EditRequest("Berlin is the capital of", "France"), k=6).selected) == 6
    for k in (0, 7):
        with pytest.raises(ValueError, match="k="):
            editor.propose(EditRequest("Berlin is the capital of", "France"), k=k)


# ---- weight state: rollback and replay ------------------------------------------------------------

def proposals(editor, n):
    return [editor.propose(EditRequest(p, t)).delta for p, t in FACTS[:n]]


def test_rollback_every_edit_in_any_order_restores_the_base(setup):
    model, _, editor, state = setup
    base_fp, base_bytes = state.fingerprint(), snapshot(model)
    deltas = proposals(editor, 5)
    for order in ([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], random.Random(0).sample(range(1, 6), 5)):
        for i, d in enumerate(deltas, start=1):
            state.apply(i, d)
        assert state.fingerprint() != base_fp
        for i in order:
            state.rollback(i)
        assert state.fingerprint() == base_fp == state.base_fingerprint
        assert snapshot(model) == base_bytes


def test_a_state_without_deltas_serves_the_same_bytes_and_resets_but_refuses_a_rebuild(setup):
    """NoDeltas (the evaluation harness: 1,000 dense ft deltas would not fit in memory) keeps nothing: the served
    bytes are those of the in-memory store, reset restores W⁰, and a rollback that would need the kept deltas
    is refused before anything changes."""
    from editor_core.state import NoDeltas

    model, _, editor, state = setup
    base_fp, base_bytes = state.fingerprint(), snapshot(model)
    deltas = proposals(editor, 3)
    for i, d in enumerate(deltas, start=1):
        state.apply(i, d)
    kept_fp, kept_bytes = state.fingerprint(), snapshot(model)
    state.reset()
    lean = WeightState(state.modules, "tiny", NoDeltas())
    for i, d in enumerate(deltas, start=1):
        lean.apply(i, d)
    assert lean.fingerprint() == kept_fp and snapshot(model) == kept_bytes
    with pytest.raises(RuntimeError, match="keeps no deltas"):
        lean.rollback(1)
    assert lean.fingerprint() == kept_fp and lean.active_ids == [1, 2, 3]
    lean.reset()
    assert lean.fingerprint() == base_fp and snapshot(model) == base_bytes


def test_trial_serves_a_delta_and_restores_every_byte_and_the_fingerprint(setup):
    model, _, editor, state = setup
    deltas = proposals(editor, 3)
    state.apply(1, deltas[0])
    fp, served, acc = state.fingerprint(), snapshot(model), {n: a.clone() for n, a in state.acc.items()}
    with state.trial(deltas[1].plus(deltas[2])):
        assert snapshot(model) != served and state.fingerprint() != fp and state.active_ids == [1]
    assert snapshot(model) == served and state.fingerprint() == fp and state.active_ids == [1]
    assert set(state.acc) == set(acc) and all(torch.equal(state.acc[n], acc[n]) for n in acc)
    state.apply(2, deltas[1])  # the trial leaves no trace that a later apply could trip on
    bad = LowRankDelta({n: (torch.full_like(l, float("nan")), r) for n, (l, r) in deltas[2].factors.items()})
    with pytest.raises(DeltaRejected):
        with state.trial(bad):
            pass
    state.rollback(2)
    assert state.fingerprint() == fp and snapshot(model) == served
    state.rollback(1)  # the fixture's state is shared: leave it at W⁰


def test_rollback_one_of_many_equals_a_fresh_replay_of_the_rest(setup):
    model, tok, editor, state = setup
    deltas = proposals(editor, 6)
    for i, d in enumerate(deltas, start=1):
        state.apply(i, d)
    state.rollback(3)
    live_fp, live_bytes = state.fingerprint(), snapshot(model)
    state.reset()
    # A "fresh process": a new model loaded from disk, replaying the serialised log without edit 3.
    fresh_model, _ = load_model(tiny_model_dir(model.arch))
    fresh = WeightState(resolve_modules(fresh_model, ALL_MLP), "tiny")
    for i, d in enumerate(deltas, start=1):
        if i != 3:
            fresh.apply(i, LowRankDelta.from_bytes(d.to_bytes()))
    assert fresh.fingerprint() == live_fp
    assert snapshot(fresh_model) == live_bytes


def test_fingerprint_is_stable_under_fp16_rebuilds():
    model, tok = load_model(tiny_model_dir("llama"), "fp16")
    editor = HiEditor.create(model, tok, SPEC, k=3, seed=1, lr_init=1e-2)
    state = WeightState(resolve_modules(model, ALL_MLP), "tiny")
    deltas = proposals(editor, 4)
    for i, d in enumerate(deltas, start=1):
        state.apply(i, d)
    state.rollback(2)
    fp = state.fingerprint()
    state.reset()
    for i in (1, 3, 4):
        state.apply(i, deltas[i - 1])
    assert state.fingerprint() == fp


def test_delta_bytes_round_trip_bit_exactly(setup):
    _, _, editor, _ = setup
    delta = editor.propose(EditRequest("Apple A5 was created by", "Google")).delta
    back = LowRankDelta.from_bytes(delta.to_bytes())
    assert back.modules == delta.modules
    for name in delta.modules:
        for a, b in zip(delta.factors[name], back.factors[name]):
            assert torch.equal(a, b) and a.dtype == b.dtype
        dense = delta.dense(name).double()
        assert abs(delta.frobenius_norm(name) - float(dense.norm())) < 1e-6 * max(1.0, float(dense.norm()))


# ---- router gradient through the straight-through estimator -------------------------------------------

def test_loss_on_the_edited_model_reaches_the_router_through_the_ste(setup):
    model, tok, editor, _ = setup
    cap = editor.capture("The Eiffel Tower is in", "Rome")
    p, m = editor.route(cap, k=3)
    assert set(m.detach().nonzero().squeeze(-1).tolist()) == set(p.topk(3).indices.tolist())
    params = {}
    for l, name in enumerate(editor.modules):
        left, right = editor.net.factors(l, cap.keys[name], cap.grads[name])
        params[f"{name}.weight"] = editor.module_map[name].weight + m[l] * (left @ right)
    rephrase = teacher_forced(tok, "Where is the Eiffel Tower? It is in", "Rome")
    loss = target_loss(functional_call(model, params, (rephrase.input_ids,)).logits, rephrase.labels)
    editor.net.zero_grad()
    loss.backward()
    grads = [q.grad for q in editor.net.router.parameters() if q.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert editor.net.router.gate.weight.grad.abs().sum() > 0


# ---- storage at Llama-3-8B scale (shapes from the config, nothing run) ----------------------------------

def test_llama3_8b_twenty_token_delta_is_under_two_percent_of_dense_fp16():
    """A real delta of a 20-token edit at Llama-3-8B's shapes (random factors of rank 20, as HiEdit's
    ΔW_l = -η Δ̃ᵀ Ũ over 20 captured tokens), serialised as the log stores it, against dense fp16 weights."""
    hidden, intermediate, n_tokens = 4096, 14336, 20  # Meta-Llama-3-8B config.json
    selected = [f"model.layers.{i}.mlp.gate_proj" for i in range(22, 27)] + \
               [f"model.layers.{i}.mlp.up_proj" for i in range(22, 26)]  # k = 9 of gate[22-30],up[22-30]
    # gate/up: nn.Linear(hidden -> intermediate): weight [d_out=14336, d_in=4096]
    g = torch.Generator().manual_seed(0)
    delta = LowRankDelta({n: (torch.randn(intermediate, n_tokens, generator=g),
                              torch.randn(n_tokens, hidden, generator=g)) for n in selected})
    assert all(delta.rank(n) == n_tokens for n in selected)      # the factors really have the edit's rank
    blob = delta.to_bytes()
    back = LowRankDelta.from_bytes(blob)                          # and the bytes really hold them
    assert back.modules == selected
    assert all(torch.equal(back.factors[n][0], delta.factors[n][0]) and
               torch.equal(back.factors[n][1], delta.factors[n][1]) for n in selected)
    dense_fp16 = len(selected) * intermediate * hidden * 2
    ratio = len(blob) / dense_fp16
    print(f"Llama-3-8B, k = 9, 20 tokens: {len(blob):,} bytes stored, {100 * ratio:.2f}% of dense fp16 "
          f"({dense_fp16:,} bytes)")
    assert ratio <= 0.02, ratio


# ---- editor checkpoints ----------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_refusal_for_another_model(setup, tmp_path):
    model, tok, editor, _ = setup
    editor.save(tmp_path / "ed")
    loaded = HiEditor.load(tmp_path / "ed", model, tok)
    req = EditRequest("Toyota is a company from", "Italy")
    a, b = editor.propose(req), loaded.propose(req)
    assert a.selected == b.selected
    for name in a.delta.modules:
        torch.testing.assert_close(a.delta.dense(name), b.delta.dense(name))
    other, other_tok = load_model(tiny_model_dir(model.arch, seed=7))  # same shapes, other weights
    with pytest.raises(CheckpointMismatch, match="trained for base model"):
        HiEditor.load(tmp_path / "ed", other, other_tok)


# ---- bad input: a ValueError naming the problem, nothing changed --------------------------------------

@pytest.mark.parametrize("prompt,target,words", [
    ("The Eiffel Tower is in", "", "target"), ("The Eiffel Tower is in", "   \t", "target"),
    ("", "Rome", "prompt"), ("   ", "Rome", "prompt"),
    ("The Eiffel Tower is in", "Rome " * 40, "target: .* over the limit"),
    ("word " * 400, "Rome", "prompt: .* over the limit")])
def test_bad_edit_input_is_rejected_and_changes_nothing(setup, prompt, target, words):
    model, _, editor, state = setup
    before, fp = snapshot(model), state.fingerprint()
    with pytest.raises(EditInputError, match=words):
        editor.propose(EditRequest(prompt, target))
    assert snapshot(model) == before and state.fingerprint() == fp


def test_unknown_layer_spec_is_a_value_error(setup):
    model, tok, _, _ = setup
    with pytest.raises(ValueError, match="unknown module kind"):
        HiEditor.create(model, tok, "mlp[1-2]")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_delta_is_rejected_and_changes_nothing(setup, bad):
    model, _, editor, state = setup
    state.apply(1, editor.propose(EditRequest("Berlin is the capital of", "France")).delta)
    before, fp = snapshot(model), state.fingerprint()
    delta = editor.propose(EditRequest("Miles Davis plays the", "violin")).delta
    name = delta.modules[0]
    delta.factors[name][0][0, 0] = bad
    with pytest.raises(DeltaRejected, match="NaN or inf"):
        state.apply(2, delta)
    assert snapshot(model) == before and state.fingerprint() == fp and state.active_ids == [1]
    state.reset()


def test_overflowing_delta_is_rejected_in_half_precision():
    model, tok = load_model(tiny_model_dir("llama"), "fp16")
    state = WeightState(resolve_modules(model, SPEC), "tiny")
    name = next(iter(state.modules))
    d_out, d_in = state.base[name].shape
    before, fp = snapshot(model), state.fingerprint()
    huge = LowRankDelta({name: (torch.full((d_out, 1), 1e3), torch.full((1, d_in), 1e3))})
    with pytest.raises(DeltaRejected, match="overflows"):
        state.apply(1, huge)
    assert snapshot(model) == before and state.fingerprint() == fp and state.active_ids == []


def test_capture_hooks_ignore_forward_passes_of_other_threads(setup):
    """The service generates in other threads while the writer captures on the same model."""
    import threading

    from editor_core.capture import thread_hooks

    model, tok, _, _ = setup
    module = resolve_modules(model, SPEC)[next(iter(resolve_modules(model, SPEC)))]
    seen = []
    ids = tok("Berlin is the capital of", return_tensors="pt")["input_ids"]
    with thread_hooks([(module, lambda m, a, o: seen.append(threading.get_ident()))]):
        worker = threading.Thread(target=lambda: model(input_ids=ids))
        worker.start()
        worker.join()
        assert seen == []
        with torch.no_grad():
            model(input_ids=ids)
        assert seen == [threading.get_ident()]
