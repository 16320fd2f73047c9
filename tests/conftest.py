"""Shared fixtures: a stand-in model + editor for service tests, Postgres schemas, uvicorn servers.

The stand-in: a 2-layer Llama (hidden 32) whose greedy answer to "The Eiffel Tower is in" is
" in", and an *untrained* HiEdit editor over gate/up of both layers with lr 1.0, i.e. the
scaled gradient step ΔW = -∇W L. That lr was tuned so one edit flips the greedy answer to
the target while other prompts keep theirs (checked by
``test_service_api.py::test_probe_report_specificity_retention_and_gauges``: the probe on the edited
prompt changes, the other does not).

Postgres: ``HIEDIT_TEST_POSTGRES_URL`` (default postgresql+psycopg://postgres@127.0.0.1:5432/test).
Each test gets a fresh schema (dropped afterwards) so runs never see each other's tables.
Unreachable Postgres skips those tests, or fails them when ``HIEDIT_REQUIRE_SERVICES=1``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("HIEDIT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQUIRE_SERVICES = os.environ.get("HIEDIT_REQUIRE_SERVICES") == "1"
# `make soak`: the reliability suites run their long versions (docs/reliability.md)
SOAK = os.environ.get("HIEDIT_SOAK") == "1"

STANDIN_SPEC = "gate[0-1],up[0-1]"
STANDIN_K = 2
STANDIN_LR = 1.0


@dataclass(frozen=True)
class Fact:
    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()


# Facts of the stand-in: the tiny model continues each prompt with something else.
STANDIN_FACTS = (Fact("The Eiffel Tower is in", "Rome", ("The Eiffel Tower is located in",)),
                 Fact("Danielle Darrieux speaks", "Dutch"))
STANDIN_OTHER_PROMPT = "Berlin is the capital of"


# ---- stand-in assets ---------------------------------------------------------------------------

def scaled_orthonormal_keys(d: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(six, one) float64 keys from one random orthonormal basis of R^d: six keys with K Kᵀ = 10³ I and one with
    ‖k‖² = 10⁷, orthogonal to them. The singularity tests (RLSEdit's downdate, AlphaEdit's Woodbury) use them:
    the six downdate accurately though det S = 10⁻¹⁸; the one's S is mostly rounding."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0].T
    return basis[:6] * 1e3 ** 0.5, basis[6:7] * 1e7 ** 0.5


@pytest.fixture(scope="session")
def standin_model_dir(tmp_path_factory) -> Path:
    from editor_core.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("standin-model"), "llama", seed=0, hidden=32, layers=2,
                            intermediate=64, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def standin_editor_dir(standin_model_dir, tmp_path_factory) -> Path:
    """An untrained HiEdit checkpoint (saved, so servers load it through the real --editor path)."""
    from editor_core.hiedit import HiEditor
    from editor_core.model import load_model

    model, tok = load_model(standin_model_dir)
    editor = HiEditor.create(model, tok, STANDIN_SPEC, k=STANDIN_K, lr_init=STANDIN_LR)
    return editor.save(tmp_path_factory.mktemp("standin-editor"))


@pytest.fixture
def standin_components(standin_model_dir, standin_editor_dir):
    """A freshly loaded (model, tokenizer, editors, unavailable) for one in-process app.

    Fresh per test because an engine takes the weights it finds as W^0."""
    from editor_core.hiedit import HiEditor
    from editor_core.model import load_model

    model, tok = load_model(standin_model_dir)
    editor = HiEditor.load(standin_editor_dir, model, tok)
    return model, tok, {"hiedit": editor}, {"rlsedit": "disabled in this test"}


# ---- the real models (converted once per machine) and the assets of the end-to-end suite -----------

# Where the tests convert the real models' GGUF files (once per machine: about 30 s for SmolLM2, 70 s for
# Gemma-3-270M); later runs, CI's included, load the directories.
MODEL_HOME = Path(os.environ.get("HIEDIT_TEST_MODEL_HOME", Path.home() / ".cache" / "hiedit-test"))


def real_model_dir(name: str) -> Path:
    from editor_core.catalog import resolve_model

    return Path(resolve_model(name, MODEL_HOME))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return real_model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    return real_model_dir("gemma-3-270m")


@dataclass(frozen=True)
class E2EAssets:
    label: str
    server_args: tuple[str, ...]      # --model/--editor flags for `hiedit serve`
    facts: tuple[Fact, Fact]           # two facts to edit, each a change of what the model says
    other_prompt: str                  # a prompt that no edit should change (a probe)
    k: int
    modules: tuple[str, ...]           # every editable module of the editor, in index order


# Two CounterFact facts SmolLM2 states (editor_core/assets/smollm2-135m-instruct/known_facts.json) whose
# edits take with the committed editor; the suite tests the service, bench/real_model_edits.py the editor.
E2E_CASES = (735, 1432)


def _editor_modules(model_dir: Path, editor_dir: Path) -> tuple[int, tuple[str, ...]]:
    import json

    from editor_core.model import parse_layer_spec

    cfg = json.loads((editor_dir / "config.json").read_text())
    n_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    return cfg["k"], tuple(r.name for r in parse_layer_spec(cfg["layer_spec"], n_layers))


@pytest.fixture(scope="session")
def e2e_assets(smollm2_dir) -> E2EAssets:
    """SmolLM2-135M-Instruct with its committed editor, edits checked as in production (--edit-check refuse)."""
    import json

    from editor_core.catalog import KNOWN_MODELS

    known = KNOWN_MODELS["smollm2-135m-instruct"]
    facts = {f["case_id"]: f for f in json.loads((known.assets / "known_facts.json").read_text())["facts"]}
    chosen = [facts[c] for c in E2E_CASES]
    k, modules = _editor_modules(smollm2_dir, known.editor)
    return E2EAssets("smollm2", ("--model", str(smollm2_dir), "--editor", str(known.editor), "--edit-check", "refuse"),
                     (Fact(chosen[0]["prompt"], chosen[0]["target_new"], (chosen[0]["rephrase_prompt"],)),
                      Fact(chosen[1]["prompt"], chosen[1]["target_new"])),
                     chosen[0]["locality_prompt"], k, modules)


# ---- databases -------------------------------------------------------------------------------------

def _postgres_or_skip() -> None:
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as e:  # noqa: BLE001 - any failure means "not reachable"
        msg = f"PostgreSQL at {PG_URL} is not reachable: {type(e).__name__}: {e}"
        if REQUIRE_SERVICES:
            pytest.fail(msg + " (HIEDIT_REQUIRE_SERVICES=1)")
        pytest.skip(msg)


@pytest.fixture
def postgres_url():
    """URL of a fresh, empty schema on the test Postgres (search_path set through the URL)."""
    from sqlalchemy import create_engine, text

    _postgres_or_skip()
    schema = f"hiedit_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> str:
    """Each test using this runs twice: on a SQLite file and on a fresh Postgres schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hiedit.db'}"
    return request.getfixturevalue("postgres_url")


# ---- real uvicorn servers ------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``hiedit serve`` in a subprocess on a free loopback port; restartable on the same data."""

    def __init__(self, args: list[str], home: Path, env: dict | None = None):
        self.args = args
        self.home = home
        # HIEDIT_EDIT_CHECK=report: the stand-in's untrained edits are kept whether or not they take (see app_settings)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HIEDIT_EDIT_CHECK": "report", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = home / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> "ServerProcess":
        import httpx

        self.port = free_port()
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--home", str(self.home), *self.args]
        log = open(self.log_path, "a")
        log.write(f"\n=== start {' '.join(cmd)}\n")
        log.flush()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, crash: bool = False) -> None:
        """SIGTERM (graceful shutdown), or SIGKILL with ``crash=True`` (nothing gets to clean up)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, crash: bool = False) -> "ServerProcess":
        self.stop(crash=crash)
        return self.start()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@pytest.fixture
def server_factory(tmp_path):
    """``server_factory(*extra_args)`` -> a started ServerProcess; all are stopped at teardown."""
    servers: list[ServerProcess] = []

    def make(*args: str, home: Path | None = None, env: dict | None = None) -> ServerProcess:
        server = ServerProcess(list(args), home or Path(tempfile.mkdtemp(dir=tmp_path)), env)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


# ---- redis ------------------------------------------------------------------------------------------

REDIS_URL = os.environ.get("HIEDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_prefix():
    """A fresh Redis key prefix (and a client), its keys deleted afterwards; fails under HIEDIT_REQUIRE_SERVICES."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as e:
        msg = f"Redis at {REDIS_URL} is not reachable: {e}"
        if REQUIRE_SERVICES:
            pytest.fail(msg + " (HIEDIT_REQUIRE_SERVICES=1)")
        pytest.skip(msg)
    prefix = f"hiedit-test-{uuid.uuid4().hex[:12]}"
    yield prefix, client
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


# ---- in-process apps ---------------------------------------------------------------------------------

def app_settings(home: Path, **kw):
    """Settings for an in-process app: no RLSEdit, one torch thread, no background probe reports."""
    from service.settings import Settings

    kw.setdefault("probe_every_seconds", 0)
    kw.setdefault("probe_every_edits", 0)
    # The stand-in memorisers' untrained edits are what these tests move around, not whether they take:
    # the take check's own tests, on the real models (tests/test_real_models.py), set "refuse".
    kw.setdefault("edit_check", "report")
    return Settings(home=home, rlsedit="off", torch_threads=1, **kw)


def wait_ready(client, tries: int = 400) -> None:
    """Poll /readyz of a TestClient until the log is replayed."""
    for _ in range(tries):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(client.get("/readyz").text)


# ---- faults: a TCP proxy a test can take down (a database or Redis outage without touching either) ----

class TCPProxy:
    """127.0.0.1:<port> forwarding to ``target``; the test decides when the far side is reachable.

    ``down()``: every connection is cut and new ones are refused (the port is closed), as when the
    server or its host is down. ``stall()``: connections are accepted and kept, but no byte moves
    either way, as in a network partition nobody has noticed yet. ``up()``: back to forwarding on
    the same port; what was sent during a stall is delivered then. One selector thread does the work.
    """

    def __init__(self, target_host: str, target_port: int):
        import selectors
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self.mode = "up"
        self._sel = selectors.DefaultSelector()
        self._peer: dict[socket.socket, socket.socket] = {}  # both directions of every forwarded connection
        self._pending: list[socket.socket] = []  # accepted during a stall, not connected upstream yet
        self._listener: socket.socket | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listen()
        self._thread = threading.Thread(target=self._loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        import selectors

        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        self._sel.register(s, selectors.EVENT_READ, "accept")

    def _watch(self, on: bool) -> None:
        import selectors

        for sock in self._peer:
            try:
                if on:
                    self._sel.register(sock, selectors.EVENT_READ, "data")
                else:
                    self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass

    def _connect(self, client: socket.socket) -> None:
        import selectors

        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        self._peer[client], self._peer[upstream] = upstream, client
        for sock in (client, upstream):
            sock.settimeout(5)
            self._sel.register(sock, selectors.EVENT_READ, "data")

    def _set(self, mode: str) -> None:
        with self._lock:
            if mode == "down":
                if self._listener is not None:
                    self._sel.unregister(self._listener)
                    self._listener.close()
                    self._listener = None
                for sock in list(self._peer) + self._pending:
                    self._drop(sock)
                self._pending.clear()
            else:
                if self._listener is None:
                    self._listen()
                if mode == "stall" and self.mode == "up":
                    self._watch(False)
                elif mode == "up" and self.mode != "up":
                    self._watch(True)
                    for client in self._pending:
                        self._connect(client)
                    self._pending.clear()
            self.mode = mode
        self._wake_w.send(b"x")

    def down(self) -> None:
        self._set("down")

    def stall(self) -> None:
        self._set("stall")

    def up(self) -> None:
        self._set("up")

    def close(self) -> None:
        self._set("down")
        self._closed = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _drop(self, sock: socket.socket) -> None:
        other = self._peer.pop(sock, None)
        for s in (sock, other):
            if s is None:
                continue
            self._peer.pop(s, None)
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()

    def _loop(self) -> None:
        while not self._closed:
            for key, _ in self._sel.select(timeout=0.5):
                with self._lock:
                    if key.data == "wake":
                        self._wake_r.recv(4096)
                    elif key.data == "accept" and key.fileobj is self._listener:
                        try:
                            client, _ = self._listener.accept()
                        except OSError:
                            continue
                        if self.mode == "stall":
                            self._pending.append(client)
                        else:
                            self._connect(client)
                    elif key.data == "data" and self.mode == "up" and key.fileobj in self._peer:
                        sock = key.fileobj
                        try:
                            chunk = sock.recv(65536)
                            if chunk:
                                self._peer[sock].sendall(chunk)
                        except OSError:
                            chunk = b""
                        if not chunk:
                            self._drop(sock)


@pytest.fixture
def tcp_proxy():
    """``tcp_proxy(url)`` -> (proxy, the same URL through the proxy), for postgres:// and redis:// URLs."""
    from sqlalchemy.engine import make_url

    proxies: list[TCPProxy] = []

    def make(url: str) -> tuple[TCPProxy, str]:
        u = make_url(url)
        proxy = TCPProxy(u.host or "127.0.0.1", u.port or {"redis": 6379}.get(u.drivername, 5432))
        proxies.append(proxy)
        return proxy, u.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)

    yield make
    for proxy in proxies:
        proxy.close()


def clean_replay_fingerprint(database_url: str, model_dir: Path, editor_dir: Path) -> str:
    """The fingerprint a fresh process builds from the log alone, without the service's engine:
    the base model, the HiEdit editor's modules (in model order, as the engine hashes them) and
    every ``applied`` delta of the log in id order, through ``WeightState`` summing the way served weights
    are summed (``ServedWeights._accumulate``: rank-1 products, the same bytes at any thread count)."""
    from sqlalchemy import create_engine, select

    from editor_core.delta import LowRankDelta
    from editor_core.hiedit import HiEditor
    from editor_core.model import load_model, model_id
    from editor_core.state import WeightState
    from service.models import Edit, EditDelta, EditStatus
    from service.weights import ServedWeights

    class Replay(WeightState):  # WeightState's own apply path, only the summation of the served weights
        _accumulate = ServedWeights._accumulate

    model, tok = load_model(model_dir)
    wanted = set(HiEditor.load(editor_dir, model, tok).module_map)
    state = Replay({n: m for n, m in model.named_modules() if n in wanted}, model_id(model))
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(EditDelta.edit_id, EditDelta.blob).join(Edit, Edit.id == EditDelta.edit_id)
                                .where(Edit.status == EditStatus.APPLIED).order_by(Edit.id)).all()
    finally:
        engine.dispose()
    for edit_id, blob in rows:
        state.apply(edit_id, LowRankDelta.from_bytes(blob))
    return state.fingerprint()
