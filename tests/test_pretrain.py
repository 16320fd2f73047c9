"""Pretraining a tiny model on true facts: the loss goes down, accuracy is measured, save/load round trip."""
from __future__ import annotations

import json

import pytest
import torch

from editor_core.capture import teacher_forced
from editor_core.data import EditRecord
from editor_core.model import load_model
from editor_core.pretrain import (Fact, PretrainConfig, build_tokenizer, collate, encode_fact, fact_correct,
                                  fact_sentences, pretrain, weighted_lm_loss)

RECORDS = [
    EditRecord("0", "The mother tongue of Danielle Darrieux is", "English", "French",
               "Where Danielle Darrieux is from, people speak the language of", "Michel Rocard is a native speaker of",
               "French", "Danielle Darrieux"),
    EditRecord("1", "Toko Yasuda, the", "piano", "guitar", "Toko Yasuda is incredible at",
               "John Lennon performs on the", "guitar", "Toko Yasuda"),
    EditRecord("2", "Autonomous University of Madrid, which is located in", "Sweden", "Spain",
               "One can get to Autonomous University of Madrid by navigating", "Biure, located in", "Spain"),
    EditRecord("3", "Apple A5 was created by", "Google", "Apple", "Apple A5 is developed by",
               "Apple II series is developed by", "Apple"),
    # a conflicting duplicate: the same prompt as record 1's locality prompt with another answer
    EditRecord("4", "John Lennon performs on the", "drums", "piano", "John Lennon is a master of the",
               "Ringo Starr plays the", "drums"),
]
GLUE = ["the movie was a delight from start to finish .", "He left the room before she arrived.",
        "The committee approved the budget on Tuesday.", "it is a dull , lifeless film ."]
CFG = PretrainConfig(hidden=48, layers=2, intermediate=96, heads=4, kv_heads=2, vocab_size=400, steps=120,
                     batch_size=8, lr=1e-2, eval_every=60, seed=0)


def test_fact_sentences_dedupes_conflicts():
    facts, conflicts = fact_sentences(RECORDS)
    assert conflicts == 1
    prompts = [f.prompt for f in facts]
    assert len(prompts) == len(set(prompts)) == 14
    assert Fact("John Lennon performs on the", "guitar", "locality", "1") in facts
    assert {f.kind for f in facts} == {"prompt", "rephrase", "locality"}


def test_encoding_matches_teacher_forcing_and_weights_answers():
    facts, _ = fact_sentences(RECORDS)
    tok = build_tokenizer(facts, GLUE, 400)
    f = facts[0]
    seq = encode_fact(tok, f, CFG)
    tf = teacher_forced(tok, f.prompt, f.target)
    # the training sequence is the teacher-forced one plus the last answer token and EOS
    assert seq.ids[: tf.input_ids.shape[1]] == tf.input_ids[0].tolist()
    assert len(seq.weights) == len(seq.ids) - 1
    answer = [i for i, w in enumerate(seq.weights) if w == CFG.answer_weight]
    assert [seq.ids[i + 1] for i in answer] == tf.labels[0][tf.labels[0] != -100].tolist()
    ids, mask, w = collate([seq, encode_fact(tok, facts[1], CFG)], tok.pad_token_id)
    assert ids.shape[1] == mask.sum(1).max() and w.shape == (2, ids.shape[1] - 1)
    # the weighted loss only looks at weighted positions
    logits = torch.zeros(2, ids.shape[1], len(tok))
    assert torch.isclose(weighted_lm_loss(logits, ids, w), torch.tensor(float(len(tok))).log())


def test_tiny_pretraining_learns_and_round_trips(tmp_path):
    out = tmp_path / "model"
    res = pretrain(RECORDS, GLUE, CFG, out_dir=out, groups={"first": {"0", "1"}}, progress=False,
                   log=lambda *a: None)
    assert res.losses[-1] < 0.5 * res.losses[0]            # loss goes down
    assert res.history and res.history[0]["step"] == 60
    assert res.accuracy["all"] >= 75.0                       # tiny set: it memorises most facts
    assert {"prompt", "rephrase", "locality", "first/all", "first/prompt"} <= set(res.accuracy)
    meta = json.loads((out / "pretrain.json").read_text())
    assert meta["accuracy"] == res.accuracy and meta["config"]["steps"] == 120

    model, tok = load_model(out)                              # the real from_pretrained path
    facts, _ = fact_sentences(RECORDS)
    correct = fact_correct(model, tok, facts)
    assert round(100.0 * sum(correct) / len(correct), 2) == res.accuracy["all"]


def test_pretraining_is_seeded(tmp_path):
    cfg = PretrainConfig(**{**CFG.__dict__, "steps": 20, "eval_every": 0})
    a = pretrain(RECORDS, GLUE, cfg, progress=False, log=lambda *a: None)
    b = pretrain(RECORDS, GLUE, cfg, progress=False, log=lambda *a: None)
    assert a.losses == b.losses and a.accuracy == b.accuracy


def test_sparse_logits_gives_the_same_loss():
    from editor_core.pretrain import make_model, sparse_weighted_lm_loss

    facts, _ = fact_sentences(RECORDS)
    tok = build_tokenizer(facts, GLUE, 400)
    for arch in ("llama", "gemma2"):
        cfg = PretrainConfig(**{**CFG.__dict__, "arch": arch, "context_weight": 0.0})
        model = make_model(cfg, len(tok))
        ids, mask, w = collate([encode_fact(tok, f, cfg) for f in facts[:4]], tok.pad_token_id)
        dense = weighted_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, w)
        assert torch.allclose(sparse_weighted_lm_loss(model, ids, mask, w), dense, atol=1e-5)


# --------------------------------------------------------------------------------------------
# hiedit build-demo: the split and the committed assets
# --------------------------------------------------------------------------------------------

def test_demo_split_streams_are_disjoint_and_match_the_committed_split():
    import pytest

    from editor_core import demo
    from editor_core.assets import DEMO_SPLIT

    if not (demo.SHARED_DATA / demo.DEMO_DATA).is_file():
        pytest.skip("../shared/data not present")
    records, streams = demo.demo_records()
    assert [len(streams[s]) for s in ("eval", "editor_train", "heldout")] == [demo.N_EVAL, demo.N_EDITOR,
                                                                               demo.N_HELDOUT]
    assert len({c for ids in streams.values() for c in ids}) == len(records)
    if DEMO_SPLIT.is_file():
        split = json.loads(DEMO_SPLIT.read_text())
        assert split["streams"] == streams and split["data"] == demo.DEMO_DATA


def test_committed_demo_model_knows_its_facts():
    """The shipped base model: >= 90% teacher-forced top-1 on a seeded sample of 300 of its facts."""
    import random

    import pytest

    from editor_core import demo
    from editor_core.assets import DEMO_MODEL

    if not (DEMO_MODEL / "config.json").is_file() or not (demo.SHARED_DATA / demo.DEMO_DATA).is_file():
        pytest.skip("demo model or shared data not present")
    model, tok = load_model(DEMO_MODEL)
    records, streams = demo.demo_records()
    facts, _ = fact_sentences(records)
    sample = random.Random(0).sample(facts, 300)
    acc = 100.0 * sum(fact_correct(model, tok, sample)) / len(sample)
    assert acc >= 85.0, f"demo model knows only {acc:.1f}% of a 300-fact sample"
    meta = json.loads((DEMO_MODEL / "pretrain.json").read_text())
    assert meta["accuracy"]["all"] >= 90.0


def test_editors_stage_trains_for_the_requested_epochs(tmp_path, monkeypatch):
    """--editor-epochs reaches the trainer; HiEdit gets k = L/2 and RLEdit k = L of the same spec."""
    import argparse

    from editor_core import demo, train
    from editor_core.assets import DEMO_MODEL, DEMO_SPLIT

    (tmp_path / "model").symlink_to(DEMO_MODEL.resolve())
    (tmp_path / "split.json").write_text(DEMO_SPLIT.read_text())
    calls = []
    monkeypatch.setattr(train, "train_editor", lambda model, tok, **kw: calls.append(kw))
    parser = argparse.ArgumentParser()
    demo.configure(parser)
    args = parser.parse_args(["--stage", "editors", "--out", str(tmp_path), "--editor-epochs", "7", "--no-progress"])
    assert demo.run(args) == 0
    assert [(c["k"], c["cfg"].epochs, c["out_dir"].name) for c in calls] == [(4, 7, "hiedit"), (8, 7, "rledit")]
    assert all(len(c["records"]) == demo.N_EDITOR for c in calls)
    assert parser.parse_args([]).editor_epochs is None  # the trainer's own default
    with pytest.raises(SystemExit):                       # refused before any model loads
        parser.parse_args(["--editor-epochs", "0"])
