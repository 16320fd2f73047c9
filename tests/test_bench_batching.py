"""bench/batching.py at its smallest size on SmolLM2: it runs, prints its JSON last, and finds no answer that
differs between a request alone and the same request among others."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import MODEL_HOME, REPO


def test_batching_bench_runs_at_its_smallest_size(tmp_path, smollm2_dir):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(MODEL_HOME / "models")  # the tests' conversion, not a new one
    done = subprocess.run([sys.executable, "bench/batching.py", "--home", str(home), "--clients", "3", "--tokens", "4",
                           "--rounds", "1", "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ours = result["hiedit"]
    assert ours["answers_differing_from_alone"] == [] and ours["requests"] == 3 * 2
    assert ours["one_client_tokens_per_s"] > 0 and ours["3_clients_tokens_per_s"] > 0 and ours["ratio"] > 0
    assert "llama_cpp" not in result  # the peer only with --llama-python
