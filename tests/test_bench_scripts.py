"""Every benchmark script at its smallest size, run as its users run it (``python bench/<script>.py``, a
subprocess), so that none rots: each exits 0 and prints a JSON object on its last stdout line that holds
the figures docs/benchmarks.md quotes. Tiny models where the script takes one; SmolLM2 (the tests' own
conversion, MODEL_HOME) where it serves only a catalog model. bench/batching.py and bench/edit_cost.py
are run the same way in tests/test_bench_serving.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import MODEL_HOME, REPO, STANDIN_SPEC

# common.py is the scripts' shared module; batching.py and edit_cost.py are run in test_bench_serving.py,
# history.py and long_history.py in test_bench_history.py.
NOT_HERE = {"common.py", "batching.py", "edit_cost.py", "history.py", "long_history.py"}


def run(script: str, *args: str, home: Path | None = None, env: dict | None = None, timeout: float = 600) -> dict:
    env = {**os.environ, "HIEDIT_HOME": str(home or MODEL_HOME), **(env or {})}
    done = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{script}: exit {done.returncode}\n{done.stderr[-4000:]}"
    last = done.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert isinstance(result, dict), last
    return result


def test_every_script_has_a_test_here():
    tested = {"edit_latency.py", "serve_overhead.py", "load.py", "startup.py", "make_model.py", "served_sum.py",
              "rlsedit_history.py", "editor_overlap.py", "real_model_edits.py", "memit_z.py", "alphaedit_solve.py"}
    assert {p.name for p in (REPO / "bench").glob("*.py")} - NOT_HERE == tested  # a new script needs its test


def test_edit_latency(tmp_path):
    r = run("edit_latency.py", "--methods", "hiedit,rledit,mend", "--mend-train-facts", "2", "--rounds", "1",
            "--warmup", "0", "--cache-dir", str(tmp_path))
    assert r["ratio_edit_to_fwd_bwd"] > 0 and r["ratio_k_half_to_k_all"] > 0
    assert set(r["ratio_to_floor"]) == {"hiedit", "rledit", "mend"} and r["p50_ms"]["floor"] > 0
    assert 0 < r["stored_over_dense"]["hiedit"] < 1


def test_serve_overhead(standin_model_dir, standin_editor_dir):
    r = run("serve_overhead.py", "--model", str(standin_model_dir), "--editor", str(standin_editor_dir),
            "--rounds", "1", "--max-new-tokens", "4", "--latency-windows", "1", "--latency-window-s", "1",
            "--latency-tokens", "2", "--edit-rate", "4")
    assert r["ratio_http_generate_to_inprocess"] > 0 and r["ratio_http_edit_to_engine_edit"] > 0
    lat = r["latency"]
    assert r["ratio_p99_during_edits_to_idle"] == lat["ratio_p99_during_edits_to_idle"] > 0
    assert lat["edits_sent"] == 4 and lat["edits_per_s_offered"] == 4.0 and lat["edits_per_s_achieved"] > 0
    assert lat["requests_idle"] > 0 and lat["requests_during_edits"] > 0
    assert len(r["load_average_start"]) == 3


def test_load(standin_model_dir, standin_editor_dir):
    r = run("load.py", "--model", str(standin_model_dir), "--editor", str(standin_editor_dir), "--duration", "2",
            "--clients", "2", "--max-new-tokens", "2")
    assert r["total_errors"] == 0 and r["generate"]["requests"] > 0 and r["generate"]["p99_ms"] > 0
    assert r["edits"]["sent"] >= 1 and r["edits"]["acknowledged"] + r["edits"]["refused"] == r["edits"]["sent"]


def test_startup(standin_model_dir, standin_editor_dir):
    # the editor through hiedit serve's own variable (startup.py passes only --model and --rlsedit)
    r = run("startup.py", "--model", str(standin_model_dir), "--rlsedit", "off", "--rounds", "0",
            env={"HIEDIT_EDITOR": str(standin_editor_dir)})
    assert r["first_start_s"] > 0 and r["later_starts_s"] == [] and "later_start_s_median" in r


def test_make_model(tmp_path):
    r = run("make_model.py", "--out", str(tmp_path / "m"))
    assert r["shape"] == "demo" and r["parameters"] > 0
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "hiedit" / "config.json").is_file()


def test_served_sum():
    r = run("served_sum.py", "--shape", "16x8", "--modules", "2", "--touched", "1", "--rank", "2", "--edits", "4",
            "--rounds", "1")
    assert r["rank1_same_bytes_at_1_and_2_threads"] is True and r["replay_s_rank1"] > 0
    assert "extra_ms_per_edit" in r


def test_memit_z():
    r = run("memit_z.py", "--n", "2", "--threads", "1")
    assert r["facts"] == 2 and r["cpu_s_kept"] > 0 and r["cpu_s_full"] > 0
    assert r["same_steps"] is True and r["max_z_rel_diff"] < 1e-3


def test_rlsedit_history():
    # the demo model's RLSEdit statistics are collected once, into $HIEDIT_HOME/cache (the tests' MODEL_HOME)
    r = run("rlsedit_history.py", "--edits", "20", "--window", "5", "--d-k", "32", "--d-v", "8", "--demo-edits", "2")
    assert r["ratio_solve_late_to_early"] > 0 and r["c_max_rel_err_vs_batch"] < 1e-8
    assert r["p50_edit_ms_demo"] > 0 and 0 < r["value_opt_share_demo"] <= 1


def test_alphaedit_solve():
    r = run("alphaedit_solve.py", "--edits", "5", "--d-k", "64")
    assert r["closed_form_ms_p50"] > 0 and r["recursive_ms_p50"] > 0 and r["drift"] < 1e-8


def test_editor_overlap(standin_model_dir, tmp_path):
    r = run("editor_overlap.py", "--model", str(standin_model_dir), "--hiedit-layers", STANDIN_SPEC,
            "--rls-layers", "down[0]", "--n", "1", home=tmp_path)
    assert r["alone"]["n"] == 1 and r["interleaved"]["n"] == 1 and r["interleaved"]["key_drift"] >= 0
    assert "retention_drop" in r


def test_real_model_edits(smollm2_dir):
    r = run("real_model_edits.py", "--n", "1", "--quiet")  # no --url: it starts hiedit serve on SmolLM2
    assert r["n"] == 1 and r["applied"] + r["refused"] == 1 and r["errors"] == []
    assert r["rollback_restores_fingerprint"] is True and r["answers_restored"] == 1
    assert r["model"] == "smollm2-135m-instruct"
