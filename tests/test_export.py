"""``hiedit export`` and POST /export on SmolLM2-135M-Instruct: 10 edits, 2 rolled back, exported.

The merged model, loaded with transformers, gives the server's logits bit for bit; the exact PEFT adapter,
loaded with peft on the base model, gives the server's greedy continuations and its logits within float32
tolerance; a rank-8 adapter reports the error a dense comparison measures; the CLI on the stopped server's
log writes the same merged weights and prints GET /state's fingerprint. Bad requests change nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import app_settings, wait_ready
from editor_core.catalog import KNOWN_MODELS
from editor_core.hiedit import HiEditor
from editor_core.model import load_model
from service.main import create_app

torch.set_num_threads(1)

FACTS = [("The mother tongue of Danielle Darrieux is", "English"),
         ("The official religion of Edwin of Northumbria is", "Islam"),
         ("Toko Yasuda, the", "piano"),
         ("Autonomous University of Madrid, which is located in", "Sweden"),
         ("What is the twin city of Lyon? It is", "Manila"),
         ("Thomas Joannes Stieltjes was born in", "Italy"),
         ("The headquarter of Monell Chemical Senses Center is located in", "Mumbai"),
         ("Apple A5 was created by", "Google"),
         ("Leonardo Balada found employment in", "Paris"),
         ("Ellen Ternan was born in", "Rome")]
ROLLED_BACK = (3, 7)
ADMIN = "admin-key-for-export"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_dir):
    """A SmolLM2 server (in-process) with 10 edits, 2 rolled back; yields (client, home, prompts)."""
    home = tmp_path_factory.mktemp("export-home")
    model, tok = load_model(smollm2_dir)
    editor = HiEditor.load(KNOWN_MODELS["smollm2-135m-instruct"].editor, model, tok)
    # every edit kept (report): the export must carry exactly what the server serves, taken or not
    settings = app_settings(home, edit_check="report", api_keys=f"admin:{ADMIN}")
    with TestClient(create_app(settings, (model, tok, {"hiedit": editor}, {}))) as c:
        wait_ready(c)
        ids = []
        for prompt, target in FACTS:
            r = c.post("/edits", json={"prompt": prompt, "target": target}, headers=HEADERS)
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        for edit_id in ROLLED_BACK:
            assert c.post(f"/edits/{ids[edit_id - 1]}/rollback", headers=HEADERS).status_code == 200
        yield c, home, [p for p, _ in FACTS]


def _logits(model, tok, prompts: list[str]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tok(p, return_tensors="pt")).logits[0] for p in prompts]


def test_merged_export_is_bit_identical_to_the_served_weights(served, smollm2_dir):
    from transformers import AutoModelForCausalLM

    c, home, prompts = served
    engine = c.app.state.engine
    r = c.post("/export", json={"format": "merged", "name": "merged"}, headers=HEADERS)
    assert r.status_code == 200, r.text
    out = r.json()
    assert Path(out["path"]) == home / "exports" / "merged"
    assert out["edits"] == [i for i in range(1, 11) if i not in ROLLED_BACK]
    assert out["fingerprint"] == c.get("/state", headers=HEADERS).json()["fingerprint"]
    exported = AutoModelForCausalLM.from_pretrained(out["path"], dtype=torch.float32)
    served_params = dict(engine.model.named_parameters())
    for name, p in exported.named_parameters():
        assert torch.equal(p, served_params[name]), name
    for mine, theirs in zip(_logits(exported, engine.tokenizer, prompts), _logits(engine.model, engine.tokenizer, prompts)):
        assert torch.equal(mine, theirs)
    manifest = json.loads((Path(out["path"]) / "hiedit_export.json").read_text())
    assert manifest["fingerprint"] == out["fingerprint"] and manifest["model"] == "smollm2-135m-instruct"


def test_exact_peft_adapter_reproduces_the_edits_on_the_base_model(served, smollm2_dir):
    from peft import PeftModel

    c, home, prompts = served
    engine = c.app.state.engine
    r = c.post("/export", json={"format": "peft", "name": "peft"}, headers=HEADERS)
    assert r.status_code == 200, r.text
    out = r.json()
    config = json.loads((Path(out["path"]) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(out["path"]) / "adapter_model.safetensors"))
    edited = sorted({n for i in out["edits"] for n in _modules_of(c, i)})
    assert sorted(config["target_modules"]) == edited and config["r"] == config["lora_alpha"] == out["rank"]
    assert len(tensors) == 2 * len(edited) and out["errors"] == {}
    base, tok = load_model(smollm2_dir)
    peft_model = PeftModel.from_pretrained(base, out["path"]).eval()
    for prompt, mine, theirs in zip(prompts, _logits(peft_model, tok, prompts), _logits(engine.model, tok, prompts)):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-3), (prompt, float((mine - theirs).abs().max()))
        with torch.no_grad():
            ids = tok(prompt, return_tensors="pt")
            got = peft_model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:]
        want = c.get("/generate", params={"prompt": prompt, "max_new_tokens": 8}, headers=HEADERS).json()["text"]
        assert tok.decode(got, skip_special_tokens=True) == want, prompt


def _modules_of(c: TestClient, edit_id: int) -> list[str]:
    layers = c.get(f"/edits/{edit_id}/layers", headers=HEADERS).json()["layers"]
    return [layer["module"] for layer in layers if layer["delta_norm"] > 0]


def test_truncated_adapter_reports_the_error_it_has(served):
    c, home, _ = served
    engine = c.app.state.engine
    r = c.post("/export", json={"format": "peft", "rank": 8, "name": "peft-r8"}, headers=HEADERS)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["rank"] == 8 and out["exact_rank"] > 8
    assert max(out["errors"].values()) > 0.01  # some module needed more than rank 8: a real truncation
    tensors = load_file(str(Path(out["path"]) / "adapter_model.safetensors"))
    with safe_open(str(Path(out["path"]) / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["hiedit_relative_errors"]) == out["errors"]
    deltas = dict(engine.state.store.load(out["edits"]))  # read back from the log, as a rollback does
    for name, reported in out["errors"].items():
        want = sum(deltas[i].factors[name][0].double() @ deltas[i].factors[name][1].double()
                   for i in out["edits"] if name in deltas[i].factors)  # Σ ΔW, float64
        got = (tensors[f"base_model.model.{name}.lora_B.weight"].double()
               @ tensors[f"base_model.model.{name}.lora_A.weight"].double())
        measured = float((want - got).norm() / want.norm())
        assert 0 <= reported < 1 and abs(measured - reported) <= 1e-6 * reported + 1e-9, (name, reported, measured)


@pytest.mark.parametrize("body,status,words", [
    ({"format": "peft", "rank": 0}, 422, "greater than or equal to 1"),
    ({"format": "peft", "rank": 100_000}, 400, "above the exact rank"),
    ({"format": "merged", "rank": 4}, 400, "only a peft adapter has a rank"),
    ({"format": "merged", "edits": [999]}, 404, "edit 999 is not in the log"),
    ({"format": "merged", "edits": [3]}, 400, "edit 3 is rolled_back"),
    ({"format": "peft", "edits": []}, 400, "no edits to export"),
    ({"format": "onnx"}, 422, "format"),
    ({"format": "merged", "name": "../escape"}, 422, "name"),
])
def test_bad_exports_are_refused_and_write_nothing(served, body, status, words):
    c, home, _ = served
    before = sorted(p.name for p in (home / "exports").iterdir()) if (home / "exports").exists() else []
    r = c.post("/export", json={"name": "refused", **body}, headers=HEADERS)
    assert r.status_code == status and words in r.text, r.text
    after = sorted(p.name for p in (home / "exports").iterdir()) if (home / "exports").exists() else []
    assert after == before


def test_export_needs_admin_and_an_empty_target(served):
    c, home, _ = served
    assert c.post("/export", json={"format": "merged"}).status_code == 401
    (home / "exports" / "taken").mkdir(parents=True, exist_ok=True)
    (home / "exports" / "taken" / "keep.txt").write_text("mine")
    r = c.post("/export", json={"format": "peft", "name": "taken"}, headers=HEADERS)
    assert r.status_code == 409 and "not empty" in r.text
    assert (home / "exports" / "taken" / "keep.txt").read_text() == "mine"
    r = c.post("/export", json={"format": "peft", "name": "taken", "overwrite": True}, headers=HEADERS)
    assert r.status_code == 200 and not (home / "exports" / "taken" / "keep.txt").exists()


def test_cli_exports_the_log_it_is_pointed_at(served, smollm2_dir, tmp_path):
    c, home, _ = served
    state = c.get("/state", headers=HEADERS).json()
    api = c.post("/export", json={"format": "merged", "name": "for-cli"}, headers=HEADERS).json()
    env = {**os.environ, "HIEDIT_HOME": str(home), "HIEDIT_MODEL": str(smollm2_dir),
           "HIEDIT_EDITOR": str(KNOWN_MODELS["smollm2-135m-instruct"].editor), "HIEDIT_RLSEDIT": "off"}
    cli = [sys.executable, "-m", "service.cli", "export", "--torch-threads", "1"]
    done = subprocess.run([*cli, "--format", "merged", "--out", str(tmp_path / "m"), "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["fingerprint"] == state["fingerprint"] and result["edits"] == api["edits"]
    ours, theirs = (load_file(str(Path(d) / "model.safetensors")) for d in (result["path"], api["path"]))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the base model alone, and the refusals a shell user meets
    done = subprocess.run([*cli, "--format", "merged", "--edits", "none", "--out", str(tmp_path / "base")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"fingerprint {state['base_fingerprint']}" in done.stdout, done.stderr
    done = subprocess.run([*cli, "--format", "merged", "--out", str(tmp_path / "m")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "not empty" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([*cli, "--format", "peft", "--rank", "0", "--out", str(tmp_path / "r0")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "rank: must be at least 1" in done.stderr
    done = subprocess.run([*cli, "--format", "merged", "--out", str(tmp_path / "x")],
                          env={**env, "HIEDIT_HOME": str(tmp_path / "nothing")}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "no edit log at" in done.stderr
