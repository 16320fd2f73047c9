"""scripts/known_facts.py without a model: the rule, the prefilter's soundness, split.json's checks."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("known_facts", REPO / "scripts" / "known_facts.py")
kf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kf)


@pytest.mark.parametrize("continuation,obj,expected", [
    (" French. She is", "French", True),
    ("\nFrench", "French", True),
    (" the French language", "French", False),
    (" Fren", "French", False),
    (" Frenchman", "French", True),  # documented: a longer word that starts with the object counts
    (" x", "  ", False),
])
def test_states(continuation, obj, expected):
    assert kf.states(continuation, obj) is expected


@pytest.mark.parametrize("first,obj,expected", [
    (" Fr", "French", True), (" French", "French", True), (" Frenchman", "French", True),
    (" ", "French", True), ("\n", "French", True), ("\ufffd", "Łódź", True),
    (" the", "French", False), (" English", "French", False),
])
def test_could_start(first, obj, expected):
    assert kf.could_start(first, obj) is expected


def test_prefilter_never_drops_a_stated_fact():
    # every first-token split of a continuation that states the object must be a candidate
    for cont, obj in ((" New York City", "New York"), ("\n\nParis, France", "Paris"), (" Rome", "Rome")):
        assert kf.states(cont, obj)
        for cut in range(1, len(cont) + 1):
            assert kf.could_start(cont[:cut], obj), (cont[:cut], obj)


def _rec(cid, prompt, subject, truth):
    return {"case_id": cid, "prompt": prompt, "subject": subject, "ground_truth": truth, "target_new": "X",
            "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": truth}


def _data(tmp_path, train, val, edit):
    for name, recs in ((kf.TRAIN_FILE, train), (kf.VAL_FILE, val), (kf.EDIT_FILE, edit)):
        (tmp_path / name).write_text(json.dumps(recs))
    return tmp_path


def test_build_split_streams_and_overlaps(tmp_path):
    train = [_rec(1, "The twin city of A is", "A", "B"), _rec(2, "P2", "S2", "T2"), _rec(3, "P3", "S3", "T3")]
    val = [_rec(10, "P10", "S10", "T10")]
    edit = [_rec(20, "The twin city of A is", "A", "C"), _rec(21, "P3", "S3", "T3"), _rec(22, "P22", "S22", "T")]
    known = {"model": "m", "records_scanned": 2, "facts": [{**edit[0], "neighbour_stated": True}]}
    split = kf.build_split(known, _data(tmp_path, train, val, edit), editor_train_n=2)
    assert split["streams"] == {"editor_train": ["1", "2"], "dev": ["10"], "eval": ["20", "21", "22"], "known": ["20"]}
    overlaps = split["checks"]["prompt_subject_overlaps"]
    # record 3 is beyond editor_train_n, so case 21 does not overlap; case 20 does, in eval and known
    assert [(o["stream"], o["case_id"], o["same_fact"]) for o in overlaps] == [("eval", 20, False), ("known", 20, False)]
    assert split["counts"]["known_neighbour_stated"] == 1


def test_build_split_refuses_shared_case_ids_and_stray_known(tmp_path):
    recs = [_rec(1, "P", "S", "T")]
    with pytest.raises(ValueError, match="shared"):
        kf.build_split({"model": "m", "records_scanned": 1, "facts": []}, _data(tmp_path, recs, [], recs))
    edit = [_rec(5, "P5", "S5", "T5"), _rec(6, "P6", "S6", "T6")]
    data = _data(tmp_path, recs, [], edit)
    with pytest.raises(ValueError, match="not among the first 1"):
        kf.build_split({"model": "m", "records_scanned": 1, "facts": [edit[1]]}, data)


def test_write_json_atomic(tmp_path):
    out = tmp_path / "a" / "b.json"
    kf.write_json_atomic(out, {"x": "é"})
    assert json.loads(out.read_text()) == {"x": "é"}
    assert [p.name for p in out.parent.iterdir()] == ["b.json"]  # no temporary file left behind
