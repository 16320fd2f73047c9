"""The service and the editors on the real models: SmolLM2-135M-Instruct and Gemma-3-270M.

An edit that does not take is refused and changes nothing; one that takes says how well it took;
the served model carries its real name; HiEdit and RLSEdit edit Gemma-3-270M. The end-to-end
suite (tests/test_service_e2e.py) runs on SmolLM2 too.
"""
from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import app_settings, wait_ready
from editor_core.catalog import KNOWN_MODELS
from editor_core.editor import EditRequest
from editor_core.hiedit import HiEditor
from editor_core.model import load_model, model_id
from editor_core.state import WeightState
from service.main import create_app

torch.set_num_threads(1)


def _smollm2_app(tmp_path, smollm2_dir, **settings):
    model, tok = load_model(smollm2_dir)
    editor = HiEditor.load(KNOWN_MODELS["smollm2-135m-instruct"].editor, model, tok)
    settings.setdefault("edit_check", "refuse")
    return create_app(app_settings(tmp_path, **settings), (model, tok, {"hiedit": editor}, {}))


def test_smollm2_states_facts_and_carries_its_name(tmp_path, smollm2_dir):
    with TestClient(_smollm2_app(tmp_path, smollm2_dir)) as c:
        wait_ready(c)
        assert c.get("/generate", params={"prompt": "The capital of France is", "max_new_tokens": 3}).json()[
            "text"].startswith(" Paris")
        assert c.get("/state").json()["model"] == "smollm2-135m-instruct"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["smollm2-135m-instruct"]


def test_an_edit_that_does_not_take_is_refused_and_changes_nothing(tmp_path, smollm2_dir):
    """No strengthening budget and a target one editor step cannot write: 422, logged as failed, nothing applied."""
    hard = {"prompt": "The capital of France is", "target": "Ouagadougou, Tombouctou and Kinshasa together"}
    with TestClient(_smollm2_app(tmp_path, smollm2_dir, edit_max_steps=0)) as c:
        wait_ready(c)
        fp0 = c.get("/state").json()["fingerprint"]
        r = c.post("/edits", json=hard)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["detail"].startswith("edit did not take: the greedy continuation of the prompt is")
        assert body["take"]["taken"] is False and body["take"]["steps"] == 0 and body["take"]["stopped"] == "budget"
        assert c.get("/state").json()["fingerprint"] == fp0
        rec = c.get(f"/edits/{body['edit_id']}").json()
        assert rec["status"] == "failed" and rec["error"].startswith("not taken: ")
        assert c.get("/generate", params={"prompt": hard["prompt"], "max_new_tokens": 3}).json()["text"].startswith(
            " Paris")
        assert 'hiedit_edits_total{method="hiedit",status="not_taken"} 1.0' in c.get("/metrics").text


def test_a_kept_edit_says_how_well_it_took(tmp_path, smollm2_dir):
    fact = {"prompt": "The mother tongue of Danielle Darrieux is", "target": "English",
            "rephrases": ["Where Danielle Darrieux is from, people speak the language of"],
            "locality": [{"prompt": "Michel Rocard is a native speaker of", "target": "French"}]}
    with TestClient(_smollm2_app(tmp_path, smollm2_dir)) as c:
        wait_ready(c)
        neighbour = c.get("/generate", params={"prompt": fact["locality"][0]["prompt"], "max_new_tokens": 8}).json()
        r = c.post("/edits", json=fact)
        assert r.status_code == 201, r.text
        take = r.json()["efficacy"]["take"]
        assert take["prompt"] is True and take["locality_kept"] == 1 and take["continuation"].startswith(" English")
        assert 0 <= take["steps"] <= take["max_steps"] and 0 < take["max_delta_rel"]
        assert c.get("/generate", params={"prompt": fact["prompt"], "max_new_tokens": 2}).json()["text"].startswith(
            " English")
        assert c.get("/generate", params={"prompt": fact["locality"][0]["prompt"],
                                          "max_new_tokens": 8}).json() == neighbour


def _target_loss(model, tok, prompt: str, target: str) -> float:
    from editor_core.capture import target_loss, teacher_forced

    ex = teacher_forced(tok, prompt, target)
    with torch.no_grad():
        return float(target_loss(model(input_ids=ex.input_ids).logits, ex.labels))


def _edit_lowers_loss_and_rolls_back(model, tok, editor) -> tuple[float, float]:
    """(target loss before, with the edit); asserts the rollback restores W⁰ bit for bit."""
    prompt, target = "The mother tongue of Danielle Darrieux is", "English"
    state = WeightState({n: model.get_submodule(n) for n in editor.modules}, model_id(model))
    fp0, loss0 = state.fingerprint(), _target_loss(model, tok, prompt, target)
    state.apply(1, editor.propose(EditRequest(prompt, target)).delta)
    loss1 = _target_loss(model, tok, prompt, target)
    state.rollback(1)
    assert state.fingerprint() == fp0 and _target_loss(model, tok, prompt, target) == loss0
    return loss0, loss1


@pytest.mark.parametrize("model_name, path, method", [
    ("smollm2-135m-instruct", "rledit", "rledit"), ("smollm2-135m-instruct", "mend", "mend"),
    ("smollm2-135m-instruct", "seed1/hiedit", "hiedit"), ("smollm2-135m-instruct", "seed1/rledit", "rledit"),
    ("smollm2-135m-instruct", "seed2/hiedit", "hiedit"), ("smollm2-135m-instruct", "seed2/rledit", "rledit"),
    ("smollm2-135m-instruct", "zsre/hiedit", "hiedit"), ("smollm2-135m-instruct", "zsre/rledit", "rledit"),
    ("smollm2-135m-instruct", "zsre/mend", "mend"),
    ("smollm2-135m-instruct", "zsre/seed1/hiedit", "hiedit"), ("smollm2-135m-instruct", "zsre/seed1/rledit", "rledit"),
    ("smollm2-135m-instruct", "zsre/seed2/hiedit", "hiedit"), ("smollm2-135m-instruct", "zsre/seed2/rledit", "rledit"),
    ("smollm2-135m-instruct", "zsre/epoch/hiedit", "hiedit"), ("smollm2-135m-instruct", "zsre/epoch/rledit", "rledit"),
    ("gemma-3-270m", "rledit", "rledit"), ("gemma-3-270m", "mend", "mend"), ("gemma-3-270m", "seed1/hiedit", "hiedit"),
    ("gemma-3-270m", "seed1/rledit", "rledit"), ("gemma-3-270m", "seed2/hiedit", "hiedit"),
    ("gemma-3-270m", "seed2/rledit", "rledit")])
def test_committed_baseline_and_replicate_editors(model_name, path, method, request):
    """issue 18's rows use committed editors beside each model's served HiEdit one (baselines, training-seed
    replicates, the ZsRE editors; the list above, docs/models.md): they load on their model (the base fingerprint
    is checked), edit the served editor's modules, k of them like it (HiEdit) or every one (k = L), and one edit
    lowers the target's loss."""
    model, tok = load_model(request.getfixturevalue("smollm2_dir" if model_name.startswith("smollm2")
                                                    else "gemma3_dir"))
    hiedit_dir = KNOWN_MODELS[model_name].editor
    editor = HiEditor.load(hiedit_dir.parent / path, model, tok)
    hiedit = HiEditor.load(hiedit_dir, model, tok)
    assert editor.method == method and editor.cfg.layer_spec == hiedit.cfg.layer_spec
    assert editor.modules == hiedit.modules and editor.cfg.tokens == hiedit.cfg.tokens == "target"
    assert editor.cfg.k == (hiedit.cfg.k if method == "hiedit" else len(hiedit.modules))
    loss0, loss1 = _edit_lowers_loss_and_rolls_back(model, tok, editor)
    assert loss1 < loss0


@pytest.fixture(scope="module")
def gemma3(gemma3_dir):
    model, tok = load_model(gemma3_dir)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model_id(model) == "gemma-3-270m"
    return model, tok


def test_hiedit_edits_gemma3(gemma3):
    """The committed Gemma-3-270M editor (or, before it is built, an untrained one) lowers the target's loss."""
    model, tok = gemma3
    committed = KNOWN_MODELS["gemma-3-270m"].editor
    editor = (HiEditor.load(committed, model, tok) if (committed / "config.json").is_file()
              else HiEditor.create(model, tok, "gate[12-13],up[12-13]", k=2, lr_init=3e-5))
    loss0, loss1 = _edit_lowers_loss_and_rolls_back(model, tok, editor)
    assert loss1 < loss0


def test_rlsedit_edits_gemma3(gemma3, tmp_path):
    """Gemma-3 normalises the MLP output before the residual, with gains near zero in some coordinates:
    MEMIT's residual target must reach down_proj through the damped preimage and a value search scaled to
    what a layer can write (memit._to_down_space, rlsedit.default_v_lr_scale). Before both, this edit
    raised the target's loss 2.94 -> 9.22 with ‖ΔW‖ in the thousands."""
    from editor_core.rlsedit import RLSEditor

    model, tok = gemma3
    editor = RLSEditor.create(model, tok, stats_max_tokens=5_000, cache_dir=str(tmp_path / "stats"))
    assert editor.cfg.v_lr_scale == 0.05
    loss0, loss1 = _edit_lowers_loss_and_rolls_back(model, tok, editor)
    assert loss1 < 0.5 * loss0
