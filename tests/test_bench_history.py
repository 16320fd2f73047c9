"""The history benchmarks (bench/history.py, bench/long_history.py) at their smallest size, as its users run it: a subprocess
that exits 0 and prints the JSON docs/benchmarks.md quotes, on the stand-in model; once with every edit real,
once with the log grown by copies (--real, the RLSEdit path of the 10,000-edit figures), and resumed."""
from __future__ import annotations

import json

from test_bench_scripts import run


def test_long_history_stream_startup_rollback_and_resume(tmp_path, standin_model_dir, standin_editor_dir):
    args = ["--model", str(standin_model_dir), "--editor", str(standin_editor_dir), "--edits", "24", "--window", "8",
            "--rss-every", "12", "--startup-rounds", "1", "--out", str(tmp_path / "h")]
    r = run("long_history.py", *args, home=tmp_path / "home")
    s = r["stream"]
    assert s["edits"] == 24 and s["applied"] + s["refused"] == 24 and s["ratio_late_to_early"] > 0
    assert set(s["rss_bytes"]) == {"0", "12", "24"} and s["ratio_rss_end_to_start"] > 0
    assert r["ratio_startup_log_to_empty"] > 0 and r["startup_s"]["log_without_checkpoints"] > 0
    assert {k: v["status"] for k, v in r["rollback"].items() if k != "active_edits"} == \
        {"newest": 200, "newest_minus_8": 200, "middle": 200}
    lines = (tmp_path / "h" / "timings.jsonl").read_text().splitlines()
    assert [json.loads(x)["i"] for x in lines] == list(range(25))
    # a rerun asking for more edits resumes the stream where it stopped (the same early window)
    more = [a if a != "24" else "30" for a in args]
    again = run("long_history.py", *more, home=tmp_path / "home")
    lines = (tmp_path / "h" / "timings.jsonl").read_text().splitlines()
    assert [json.loads(x)["i"] for x in lines] == list(range(31)) and again["stream"]["edits"] == 30
    assert again["stream"]["p50_cpu_ms_early"] == s["p50_cpu_ms_early"]


def test_long_history_grows_the_log_by_copies(tmp_path, standin_model_dir, standin_editor_dir):
    r = run("long_history.py", "--model", str(standin_model_dir), "--editor", str(standin_editor_dir),
            "--edits", "60", "--real", "16", "--window", "8", "--rss-every", "30", "--startup-rounds", "1",
            "--out", str(tmp_path / "h"), home=tmp_path / "home")
    assert r["stream"]["edits"] == 16 and r["copied_to"] == 60
    assert set(r["rss_bytes_after_start"]) == {"0", "30", "60"}
    assert r["rollback"]["active_edits"] == 60


def test_history_several_methods(tmp_path, standin_model_dir, standin_editor_dir):
    r = run("history.py", "--model", str(standin_model_dir), "--editor", str(standin_editor_dir), "--methods",
            "hiedit", "--edits", "20", "--window", "5", "--startup-rounds", "1", "--rollbacks", "1",
            "--keep", str(tmp_path / "h"), home=tmp_path / "home", env={"HIEDIT_EDIT_CHECK": "report"})
    h = r["methods"]["hiedit"]
    assert h["edits"] == 20 and h["ratio_late_to_early"] > 0 and h["ratio_startup_log_to_empty"] > 0
    # (stored over dense bytes exceeds 1 on the stand-in: safetensors headers outweigh its 32x64 modules)
    assert h["stored_over_dense_mean"] > 0 and r["rollback"]["n"] == 1 and r["memory"]["model_bytes"] > 0
