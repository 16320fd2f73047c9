"""What rolling back an RLSEdit edit restores, and what it does not (docs/rlsedit.md, "Rollback").

50 sequential RLSEdit edits on the tiny Llama (one edited layer, the default for shallow models), then
edit 10 is rolled back; against it, a fresh RLSEdit run of the other 49 requests, made without edit 10.

- restored exactly: the served weights are W⁰ + the stored deltas of the other 49 (bit for bit what a
  replay of the log without edit 10 builds), and C is the inverse over the other 49 edits' keys, which
  is the fresh run's C (the keys of one edited layer do not depend on its own edits);
- not restored: the later edits' deltas were computed with edit 10 in C and in the weights, so the
  weights are not the fresh run's. The test measures that difference and prints it.
"""
from __future__ import annotations

import json

import torch

from editor_core.data import SHARED_DATA, load_counterfact
from editor_core.editor import EditRequest
from editor_core.model import load_model
from editor_core.rlsedit import RLSEditConfig, RLSEditor
from editor_core.state import WeightState
from tiny_models import tiny_model_dir

# as tests/test_rlsedit.py's FAST, on the default (single) layer of a shallow model
FAST = dict(n_contexts=2, v_steps=8, v_lr=0.05, v_weight_decay=1e-3, clamp_norm_factor=4.0,
            stats_max_tokens=3000, stats_max_length=64)
N, GONE = 50, 10


def _requests(n: int) -> list[EditRequest]:
    records, _ = load_counterfact(SHARED_DATA / "counterfact" / "counterfact-edit.json", limit=n)
    return [EditRequest(r.prompt, r.target_new, subject=r.subject or None) for r in records]


def _run(model, tok, cache, requests: list[tuple[int, EditRequest]]):
    editor = RLSEditor.create(model, tok, cfg=RLSEditConfig(cache_dir=str(cache), **FAST))
    state = WeightState(dict(editor.module_map), "tiny")
    deltas, blobs = {}, {}
    for edit_id, request in requests:
        proposal = editor.propose(request)
        state.apply(edit_id, proposal.delta)
        editor.commit(edit_id, proposal)
        deltas[edit_id], blobs[edit_id] = proposal.delta, proposal.state_blob
    return editor, state, deltas, blobs


def test_rollback_of_edit_10_of_50_restores_the_log_and_c_but_not_the_rls_solution(tmp_path):
    model, tok = load_model(tiny_model_dir("llama"), "float32")
    requests = list(enumerate(_requests(N), 1))
    assert len(requests) == N

    editor, state, deltas, blobs = _run(model, tok, tmp_path, requests)
    (name,) = editor.modules
    state.rollback(GONE)
    editor.forget(GONE, blobs[GONE])
    w_rolled_back = editor.module_map[name].weight.detach().clone()
    c_rolled_back = editor.C[name].clone()

    # exactly a replay of the log without edit 10: the stored deltas of the other 49, in id order
    state.reset()
    replay = WeightState(dict(editor.module_map), "tiny")
    for edit_id, delta in sorted(deltas.items()):
        if edit_id != GONE:
            replay.apply(edit_id, delta)
    assert torch.equal(editor.module_map[name].weight, w_rolled_back)
    w0 = replay.base[name]
    replay.reset()

    fresh, fresh_state, _, _ = _run(model, tok, tmp_path, [(i, r) for i, r in requests if i != GONE])
    w_fresh = fresh.module_map[name].weight.detach().clone()
    c_fresh = fresh.C[name]
    fresh_state.reset()

    c_rel = float((c_rolled_back.double() - c_fresh.double()).norm() / c_fresh.double().norm())
    w_rel = float((w_rolled_back - w_fresh).norm() / (w_fresh - w0).norm())
    print(json.dumps({"edits": N, "rolled_back": GONE, "module": name, "c_rel_diff": c_rel,
                      "w_rel_diff_vs_fresh_49": w_rel}))
    # C: the other 49 edits' keys, as if edit 10 had never been seen (float64 downdate rounding only)
    assert c_rel < 1e-8, c_rel
    # W: not the fresh run's; what the later edits compensated for edit 10 stays in their deltas
    assert w_rel > 1e-3, w_rel
