"""Dataset loaders on the real shared files and on bad records."""
from __future__ import annotations

import json

import pytest

from editor_core.data import (SHARED_DATA, DatasetError, EditRecord, detect_format, glue_sentences,
                              load_counterfact, load_records, load_zsre)
from editor_core.tiny import train_tokenizer

CF = SHARED_DATA / "counterfact"
ZSRE = SHARED_DATA / "zsre" / "zsre_mend_train_1k.json"
ROME = CF / "counterfact_rome_format_preview7.json"

needs_data = pytest.mark.skipif(not (CF / "counterfact-edit.json").is_file(), reason="../shared/data not present")


def _write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


FLAT = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
        "target_new": "English", "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
ZS = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "rephrase": "What will UniFirst make?",
      "alt": "unmanned aircraft", "answers": ["uniform"], "loc": "nq question: who wrote hamlet",
      "loc_ans": "Shakespeare"}


@needs_data
def test_counterfact_flat_real_files():
    res = load_counterfact(CF / "counterfact-edit.json")
    assert res.format == "counterfact-flat" and res.skipped == 0
    assert len(res.records) == 10_000
    first = res.records[0]
    assert first == EditRecord(case_id="0", prompt="The mother tongue of Danielle Darrieux is", target_new="English",
                               target_true="French",
                               rephrase="Where Danielle Darrieux is from, people speak the language of",
                               locality_prompt="Michel Rocard is a native speaker of", locality_target="French",
                               subject="Danielle Darrieux")
    assert len(load_records(CF / "counterfact-val.json", limit=25)) == 25


@needs_data
def test_counterfact_rome_preview_matches_flattened():
    rome = load_records(ROME)
    assert rome.format == "counterfact-rome" and len(rome.records) == 7
    flat = {r.case_id: r for r in load_counterfact(CF / "counterfact-edit.json", limit=50).records}
    for r in rome.records:
        assert "{}" not in r.prompt and r.subject in r.prompt
        if r.case_id in flat:  # same fact in both formats: prompt and both targets agree
            f = flat[r.case_id]
            assert (r.prompt, r.target_new, r.target_true) == (f.prompt, f.target_new, f.target_true)
    raw = json.loads(ROME.read_text())
    # deterministic choice: the first paraphrase / neighbour without a seed ...
    assert rome.records[0].rephrase == raw[0]["paraphrase_prompts"][0]
    assert rome.records[0].locality_prompt == raw[0]["neighborhood_prompts"][0]
    assert rome.records[0].locality_target == raw[0]["requested_rewrite"]["target_true"]["str"]
    # ... and a seeded one that is the same on every load
    a, b = load_records(ROME, seed=3), load_records(ROME, seed=3)
    assert a.records == b.records
    assert all(r.locality_prompt in raw[i]["neighborhood_prompts"] for i, r in enumerate(a.records))
    assert any(x.locality_prompt != y.locality_prompt for x, y in zip(a.records, rome.records))


@needs_data
def test_zsre_real_file_has_two_empty_targets():
    with pytest.raises(DatasetError) as err:
        load_zsre(ZSRE)
    assert "zsre_mend_train_1k.json" in str(err.value) and "record 534" in str(err.value)
    assert err.value.field == "alt" and "empty target" in str(err.value)
    res = load_records(ZSRE, skip_bad=True)
    assert res.format == "zsre-mend" and res.skipped == 2 and len(res.records) == 998
    r = res.records[0]
    assert r.prompt == "What is the product made by UniFirst?" and r.target_new == "unmanned aircraft"
    assert r.locality_prompt.startswith("nq question: ") and r.target_true == ""


@pytest.mark.parametrize("field", ["prompt", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
                                   "locality_ground_truth", "case_id"])
def test_flat_missing_field_names_file_index_field(tmp_path, field):
    bad = dict(FLAT, case_id=1)
    del bad[field]
    path = _write(tmp_path, "cf_bad.json", [FLAT, bad, dict(FLAT, case_id=2)])
    with pytest.raises(DatasetError) as err:
        load_counterfact(path)
    msg = str(err.value)
    assert "cf_bad.json" in msg and "record 1" in msg and repr(field) in msg
    assert err.value.index == 1 and err.value.field == field
    res = load_counterfact(path, skip_bad=True)
    assert res.skipped == 1 and [r.case_id for r in res.records] == ["0", "2"]
    assert len(res.errors) == 1 and "record 1" in res.errors[0]


def test_empty_targets_are_refused(tmp_path):
    path = _write(tmp_path, "z.json", [ZS, dict(ZS, alt="  "), dict(ZS, loc_ans="")])
    with pytest.raises(DatasetError, match=r"z\.json: record 1: field 'alt': empty target"):
        load_zsre(path)
    records, skipped = load_zsre(path, skip_bad=True)
    assert skipped == 2 and len(records) == 1
    path = _write(tmp_path, "cf.json", [dict(FLAT, target_new="")])
    with pytest.raises(DatasetError, match=r"record 0: field 'target_new': empty target"):
        load_records(path)


def test_rome_missing_nested_field(tmp_path):
    rec = {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                               "target_new": {"str": "English"}, "target_true": {"str": "French"}},
           "paraphrase_prompts": ["Danielle Darrieux, a native"], "neighborhood_prompts": ["Léon Blum speaks"]}
    broken = json.loads(json.dumps(rec))
    del broken["requested_rewrite"]["target_true"]
    path = _write(tmp_path, "rome.json", [rec, broken])
    with pytest.raises(DatasetError) as err:
        load_records(path)
    assert err.value.index == 1 and err.value.field == "requested_rewrite.target_true.str"
    assert load_records(path, skip_bad=True).skipped == 1
    nolist = dict(rec, paraphrase_prompts=[])
    with pytest.raises(DatasetError, match="paraphrase_prompts"):
        load_records(_write(tmp_path, "rome2.json", [nolist]))


def test_tokenizer_that_cannot_encode(tmp_path):
    # A BPE with no byte fallback and no 'Ж' in its alphabet maps it to <|unk|>.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([json.dumps(FLAT)] * 3, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    path = _write(tmp_path, "cf.json", [FLAT, dict(FLAT, case_id=1, locality_ground_truth="Ж")])
    with pytest.raises(DatasetError) as err:
        load_counterfact(path, tokenizer=tokenizer)
    assert err.value.index == 1 and err.value.field == "locality_ground_truth" and "cf.json" in str(err.value)
    res = load_counterfact(path, tokenizer=tokenizer, skip_bad=True)
    assert res.skipped == 1 and len(res.records) == 1
    # a byte-level tokenizer encodes anything
    assert load_counterfact(path, tokenizer=train_tokenizer(["hello world"], vocab_size=300)).skipped == 0


def test_unknown_format_and_not_a_list(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset format"):
        detect_format(_write(tmp_path, "x.json", [{"foo": 1}]))
    with pytest.raises(DatasetError, match="top-level JSON list"):
        load_records(_write(tmp_path, "y.json", {"a": 1}))
    with pytest.raises(DatasetError, match="no such file"):
        load_records(tmp_path / "missing.json")


@needs_data
def test_glue_sentences_split_is_deterministic_and_disjoint():
    train = list(glue_sentences("train"))
    held = list(glue_sentences("heldout"))
    assert len(train) > 5000 and 300 < len(held) < 1200
    assert not set(train) & set(held)
    assert held == list(glue_sentences("heldout"))
    assert set(train) | set(held) == set(glue_sentences("all"))
    assert all(s == " ".join(s.split()) and s for s in held)
    with pytest.raises(ValueError, match="split"):
        list(glue_sentences("test"))
