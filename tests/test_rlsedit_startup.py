"""RLSEdit at start: where its statistics come from, why it is off when it is, and two editors on layers
where HiEdit's edits would make RLSEdit's history stale (service/loading.py)."""
from __future__ import annotations

import logging

import pytest

from conftest import app_settings
from service.loading import ConfigError, load_all


def test_without_its_corpus_rlsedit_is_off_and_the_start_says_why(tmp_path, standin_model_dir, monkeypatch, caplog):
    import editor_core.stats as stats
    monkeypatch.setattr(stats, "DEFAULT_CORPUS", tmp_path / "no-such-corpus")  # as in a wheel or the image
    caplog.set_level(logging.WARNING, "hiedit.loading")
    cfg = app_settings(tmp_path, model=str(standin_model_dir), editor="none", rlsedit_stats_tokens=2000)
    _, _, editors, unavailable = load_all(cfg.model_copy(update={"rlsedit": "auto"}))
    assert "rlsedit" not in editors
    assert "HIEDIT_RLSEDIT_STATS_CORPUS" in unavailable["rlsedit"] and str(tmp_path / "no-such-corpus") in unavailable["rlsedit"]
    assert f"rlsedit is OFF: {unavailable['rlsedit']}" in caplog.text

    # a configured corpus that is not there (the image's default path in an empty volume): named
    _, _, editors, unavailable = load_all(cfg.model_copy(update={"rlsedit": "auto",
                                                                 "rlsedit_stats_corpus": str(tmp_path / "vol")}))
    assert "rlsedit" not in editors
    assert f"HIEDIT_RLSEDIT_STATS_CORPUS={tmp_path / 'vol'} does not exist" in unavailable["rlsedit"]

    # a configured corpus: collected from it
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The river {i} flows into the sea near the old town of Varn." for i in range(300)))
    cfg = cfg.model_copy(update={"rlsedit": "auto", "rlsedit_stats_corpus": str(corpus)})
    _, _, editors, unavailable = load_all(cfg)
    assert "rlsedit" in editors and "rlsedit" not in unavailable

    # statistics collected elsewhere (this run's cache), and no corpus at all
    collected = next((tmp_path / "cache" / "rlsedit-stats").iterdir())
    cfg = cfg.model_copy(update={"rlsedit_stats_corpus": None, "rlsedit_stats": str(collected),
                                 "home": tmp_path / "elsewhere"})
    _, _, editors, unavailable = load_all(cfg)
    assert "rlsedit" in editors and "rlsedit" not in unavailable


def test_overlapping_editors_are_refused_unless_allowed(tmp_path, standin_model_dir, standin_editor_dir, caplog):
    # the stand-in: HiEdit on gate[0-1],up[0-1], RLSEdit's default down[0] of a 2-layer model
    caplog.set_level(logging.WARNING, "hiedit.loading")
    base = app_settings(tmp_path, model=str(standin_model_dir), editor=str(standin_editor_dir),
                        rlsedit_stats_tokens=2000)
    _, _, editors, unavailable = load_all(base.model_copy(update={"rlsedit": "auto"}))
    assert sorted(editors) == ["hiedit"]
    assert "model.layers.0.mlp.gate_proj, at or below RLSEdit's model.layers.0.mlp.down_proj" in unavailable["rlsedit"]
    assert "rlsedit is OFF: HiEdit edits" in caplog.text
    with pytest.raises(ConfigError, match="--rlsedit on: .*at or below RLSEdit's"):
        load_all(base.model_copy(update={"rlsedit": "on"}))
    _, _, editors, _ = load_all(base.model_copy(update={"rlsedit": "on", "rlsedit_overlap": "allow"}))
    assert sorted(editors) == ["hiedit", "rlsedit"]
    # RLSEdit above every HiEdit layer: no overlap (its keys do not depend on higher layers)
    other = app_settings(tmp_path, model=str(standin_model_dir), untrained_editor="gate[1],up[1]",
                         rlsedit_stats_tokens=2000, rlsedit_layers="down[0]")
    _, _, editors, _ = load_all(other.model_copy(update={"rlsedit": "on"}))
    assert sorted(editors) == ["hiedit", "rlsedit"]
