"""What the benchmarks share: the assets they run on, a ``hiedit serve`` subprocess, the stream of
facts to edit, percentiles, and a process's CPU time and peak memory (read from /proc).

Imported as ``bench.common`` by the scripts next to it (each puts the repository root on sys.path
first, so ``python bench/<script>.py`` works from anywhere) and by the reliability tests.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Flags every benchmarked server gets: no background probe reports (they are jobs of their own,
# measured by their own figure), so the timings are the edit or the generation asked for.
QUIET_SERVER = ("--probe-every-edits", "0", "--probe-every-seconds", "0", "--log-level", "warning")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of a non-empty list."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, for the JSON of a run on a shared machine."""
    return [round(x, 2) for x in os.getloadavg()]


def emit(result: dict) -> dict:
    """Print the figures as the JSON object on the script's last line."""
    print(json.dumps(result), flush=True)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- assets ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Assets:
    label: str
    model: str
    editor_args: tuple[str, ...]   # `hiedit serve` flags naming the editor

    def settings_fields(self) -> dict:
        """The Settings fields for the same flags (an in-process engine on the same editor)."""
        out, it = {"model": self.model}, iter(self.editor_args)
        for flag in it:
            out[flag[2:].replace("-", "_")] = next(it)
        return out


def assets(model: str | None = None, editor: str | None = None) -> Assets:
    """The demo model and its HiEdit editor when built (what `hiedit serve` serves with no options),
    else a tiny randomly initialised Llama with an untrained editor; or the given model/editor."""
    from editor_core.assets import DEMO_HIEDIT, DEMO_MODEL

    if model is not None:
        return Assets(model, model, ("--editor", editor or "none"))
    if (DEMO_MODEL / "config.json").is_file() and (DEMO_HIEDIT / "config.json").is_file():
        return Assets("demo", str(DEMO_MODEL), ("--editor", str(DEMO_HIEDIT)))
    from editor_core.tiny import build_tiny_model

    tiny = build_tiny_model(Path(tempfile.mkdtemp(prefix="hiedit-bench-")) / "tiny", "llama", seed=0, hidden=64,
                            layers=4, intermediate=128)
    return Assets("tiny stand-in (demo assets not built)", str(tiny),
                  ("--untrained-editor", "gate[0-3],up[0-3]", "--untrained-lr", "1.0"))


SMOLLM2 = "smollm2-135m-instruct"


def hiedit_home() -> Path:
    """``$HIEDIT_HOME``, else ``hiedit serve``'s default data directory: where a real model is converted once
    per machine (``models/``), so a benchmark on it does not convert it again."""
    from service.settings import default_home

    return Path(os.environ.get("HIEDIT_HOME") or default_home())


def real_model(name: str = SMOLLM2) -> Assets:
    """A model of the catalog (converted under :func:`hiedit_home` on first use) with its committed HiEdit
    editor: what ``hiedit serve --model <name>`` serves."""
    from editor_core.catalog import KNOWN_MODELS, resolve_model

    known = KNOWN_MODELS[name]
    return Assets(name, resolve_model(name, hiedit_home()), ("--editor", str(known.editor)))


def known_facts(name: str) -> list[dict]:
    """Edit requests of the facts the catalog model ``name`` states (its ``known_facts.json``), each to its
    CounterFact target, in file order."""
    from editor_core.catalog import KNOWN_MODELS

    facts = json.loads((KNOWN_MODELS[name].assets / "known_facts.json").read_text())["facts"]
    return [{"prompt": f["prompt"], "target": f["target_new"], **({"subject": f["subject"]} if f.get("subject") else {})}
            for f in facts]


def edit_facts(n: int) -> list[dict]:
    """``n`` edit requests: CounterFact facts of the demo split's evaluation stream, in stream order
    (cycled, with the targets rotated, when more are asked for than the stream holds)."""
    from editor_core.assets import DEMO_SPLIT
    from editor_core.data import SHARED_DATA, load_counterfact

    split = json.loads(DEMO_SPLIT.read_text())
    records = {r.case_id: r for r in load_counterfact(SHARED_DATA / split["data"]).records}
    stream = [records[c] for c in split["streams"]["eval"] if c in records]
    out = []
    for i in range(n):
        r = stream[i % len(stream)]
        target = r.target_new if i < len(stream) else stream[(i + i // len(stream)) % len(stream)].target_new
        out.append({"prompt": r.prompt, "target": target, **({"subject": r.subject} if r.subject else {})})
    return out


# ---- a server process -----------------------------------------------------------------------------------

class Server:
    """``hiedit serve`` in a subprocess on a free loopback port, with its CPU time and memory from /proc."""

    def __init__(self, args: list[str], home: Path, env: dict | None = None):
        self.args = list(args)
        self.home = Path(home)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = self.home / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 900.0) -> float:
        """Start and wait for /readyz; returns the seconds from spawn to ready."""
        import httpx

        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--home", str(self.home), *self.args]
        log = open(self.log_path, "a")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        return process_cpu_seconds(self.proc.pid)

    def peak_rss_bytes(self) -> int:
        return process_memory(self.proc.pid)["VmHWM"]

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out
