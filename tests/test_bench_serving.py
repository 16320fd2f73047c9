"""The real-model serving benchmarks at their smallest size on SmolLM2, so that none rots: each runs, prints its
JSON last, and its figures are the kind they claim to be."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import MODEL_HOME, REPO


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(MODEL_HOME / "models")  # the tests' conversion, not a new one
    return home


def test_batching_bench_runs_at_its_smallest_size(tmp_path, smollm2_dir):
    home = _home(tmp_path)
    done = subprocess.run([sys.executable, "bench/batching.py", "--home", str(home), "--clients", "3", "--tokens", "4",
                           "--rounds", "1", "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ours = result["hiedit"]
    assert ours["answers_differing_from_alone"] == [] and ours["requests"] == 3 * 2
    assert ours["one_client_tokens_per_s"] > 0 and ours["3_clients_tokens_per_s"] > 0 and ours["ratio"] > 0
    assert "llama_cpp" not in result  # the peer only with --llama-python


def test_edit_cost_bench_runs_at_its_smallest_size(tmp_path, smollm2_dir):
    done = subprocess.run([sys.executable, "bench/edit_cost.py", "--home", str(_home(tmp_path)), "--n", "2",
                           "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["n"] == 2 and result["kept"] + result["refused"] == 2
    assert result["edit_ms_p50"] > result["floor_ms_p50"] > 0  # an edit contains at least its own gradient
    assert abs(result["edit_over_floor_p50"] - result["edit_ms_p50"] / result["floor_ms_p50"]) < 0.02
