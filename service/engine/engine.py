"""The single-writer edit engine: owns the weights, the editors, the write lock and the log.

Threads:

* request threads (FastAPI's thread pool) *read*: ``generate`` holds the read side of
  :class:`RWLock` for the whole generation, so it sees the weights before or after an edit,
  never in between;
* one writer thread runs every job that changes state, one at a time, in arrival order:
  replaying the log at start, edits, rollbacks and the probe/retention report. Gradient
  capture and the editor's proposal run on the writer without any lock (readers keep
  generating meanwhile); only the pointer swap inside ``WeightState`` takes the write side;
* a timer thread queues the periodic probe report.

An edit runs: validate -> propose -> guard (finite, shapes, norm bound) -> log (edit row,
per-module rows and delta blob in one transaction) -> apply -> editor.commit -> score.
The database is the source of truth: a logged edit whose apply fails is marked ``failed``,
and a start replays every ``applied`` edit in id order.

Where each part lives (this package): the job queue, the writer thread and the request-thread entry
points here; ``replay.py`` (log -> weights, the sync after an uncertain write, a 503 for a lost
database), ``snapshots.py``, ``edits.py`` (the edit job), ``take.py`` (the take check and its
strengthening), ``rollback.py``, ``scoring.py`` (teacher-forced passes, greedy ids), ``probes.py``
(probes and reports), ``locking.py`` (RWLock), ``errors.py``. Each of those holds one mixin of
:class:`EditEngine`, a plain class whose methods use the engine's attributes (``self`` is the engine).
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from editor_core.editor import Editor
from editor_core.model import model_id

from .. import db
from ..batching import Batcher, GenerationRequest
from ..metrics import Metrics
from ..settings import Settings
from ..weights import LogDeltas, ServedWeights, base_model_fingerprint
from .edits import EditSpec, EditsMixin
from .errors import InvalidRequest, Unavailable
from .locking import RWLock
from .probes import ProbeReport, ProbesMixin
from .replay import ReplayMixin
from .rollback import RollbackMixin
from .scoring import ScoringMixin
from .snapshots import SnapshotsMixin
from .take import TakeMixin

GREEDY_BELOW = 1e-4  # sampling temperatures below this are greedy decoding


_STOP = object()


class EditEngine(ReplayMixin, SnapshotsMixin, EditsMixin, TakeMixin, RollbackMixin, ProbesMixin,
                 ScoringMixin):
    """Owns model weights (through WeightState), editors, the writer thread and the log.

    Args:
        settings: server settings (limits, probe intervals).
        model, tokenizer: the served model; its editable weights are changed only here.
        editors: {method: editor} of the methods this server can edit with.
        unavailable: {method: reason} of known methods that are not available, for 503 messages.
        sessions: sessionmaker bound to the migrated database.
        metrics: where counters and gauges go.
    """

    def __init__(self, settings: Settings, model: nn.Module, tokenizer, editors: dict[str, Editor],
                 unavailable: dict[str, str], sessions: sessionmaker[Session], metrics: Metrics):
        self.settings = settings
        self.model = model
        self.tokenizer = tokenizer
        self.editors = editors
        self.unavailable = unavailable
        self.sessions = sessions
        self.metrics = metrics
        self.model_name = model_id(model)
        self.device = next(model.parameters()).device
        self.lock = RWLock()
        # The active deltas stay in the log (LogDeltas reads them back for a rollback); checkpoints of the
        # accumulators make starts and rollbacks replay only the edits since the newest one (service/weights.py).
        self.state = ServedWeights(self._editable_modules(), self.model_name,
                                   store=LogDeltas(self._delta_blobs, self.device),
                                   checkpoint_dir=settings.home / "state" / "weights")
        # ‖W⁰_l‖_F of every editable module: the take check's norm bound, relative to it
        self._base_norms = {name: float(w.float().norm()) for name, w in self.state.base.items()}
        # W⁰'s identity, taken before any edit is applied: every edit row records it, and a start on a log
        # written for another base model is refused (check_base_model). Unlike state.base_fingerprint
        # (editable modules only, served dtype) it does not change with the editor settings or --dtype.
        self.base_fingerprint = base_model_fingerprint(model, self.model_name)
        self.ready = False
        self.started_at = int(time.time())  # unix seconds: the "created" of GET /v1/models
        self.startup_error: str | None = None
        self.report: ProbeReport | None = None
        self.coordinator = None  # service.coordination.Coordinator when Redis is configured (scale-out)
        self.reachability = db.Reachability(sessions, timeout=settings.db_check_timeout_seconds)
        self._log_uncertain = False  # a write to the log failed in a way that may have committed
        self._seen_regained = 0      # coordinator.regained when the log was last known to match
        self._queue: queue.Queue = queue.Queue()
        # Every generation request is decoded by one loop, batched with the others (service/batching.py).
        self.batcher = Batcher(model, tokenizer, self.lock, settings.max_concurrent_generations)
        self._edits_since_report = 0
        self._changes_since_snapshot = 0
        self._report_pending = threading.Event()
        self._last_report_t = time.monotonic()
        self._next_report_at = 0.0  # edit-count reports wait until then (HIEDIT_PROBE_MAX_DUTY)
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._writer_loop, name="hiedit-writer", daemon=True)
        self._timer = threading.Thread(target=self._timer_loop, name="hiedit-probe-timer", daemon=True)
        methods = ",".join(sorted(editors)) or "none"
        metrics.model_info.labels(model=self.model_name, methods=methods).set(1)

    def _editable_modules(self) -> dict[str, nn.Linear]:
        """Union of every editor's modules, in the model's module order (a stable fingerprint order)."""
        wanted: dict[str, nn.Linear] = {}
        for editor in self.editors.values():
            for name in editor.modules:
                wanted[name] = self.model.get_submodule(name)
        return {name: mod for name, mod in self.model.named_modules() if name in wanted}

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> concurrent.futures.Future:
        """Start the writer with the log replay as its first job; readiness follows the replay."""
        self._writer.start()
        self.batcher.start()
        fut = self._submit(self._replay)
        self._timer.start()
        return fut

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.batcher.stop(timeout)
        if self._writer.is_alive():
            self._submit(self._save_editor_snapshots)  # after the jobs already queued
        self._queue.put(_STOP)
        if self._writer.is_alive():
            self._writer.join(timeout)

    def _submit(self, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fn, args, kwargs, fut))
        self.metrics.queue_depth.set(self._queue.qsize())
        return fut

    def _writer_loop(self) -> None:
        while True:
            item = self._queue.get()
            self.metrics.queue_depth.set(self._queue.qsize())
            if item is _STOP:
                return
            fn, args, kwargs, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # the writer must survive any one job
                fut.set_exception(e)
            self._maybe_queue_report()
            every = self.settings.editor_snapshot_every
            if every and self._changes_since_snapshot >= every:
                self._save_editor_snapshots()

    # ---- public entry points (called from request threads) ---------------------------------------

    def submit_edit(self, spec: EditSpec, idempotency_key: str | None, actor: str) -> concurrent.futures.Future:
        """Queue an edit; the future resolves to (Edit, created: bool) or raises an EngineError."""
        return self._submit(self._edit_job, spec, idempotency_key, actor)

    def submit_rollback(self, edit_id: int, actor: str = "anonymous") -> concurrent.futures.Future:
        return self._submit(self._rollback_job, edit_id, actor)

    def submit_report(self) -> concurrent.futures.Future:
        return self._submit(self._report_job)

    def fingerprint(self) -> str:
        with self.lock.read():  # hashing a module mid-swap would mix states
            return self.state.fingerprint()

    def prompt_ids(self, prompt: str) -> list[int]:
        """The token ids a generation of ``prompt`` starts from (requests and probes: one tokenisation)."""
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def check_prompt(self, prompt: str, field_name: str = "prompt") -> list[int]:
        ids = self.prompt_ids(prompt)
        if len(ids) > self.settings.max_prompt_tokens:
            raise InvalidRequest(f"{field_name}: {len(ids)} tokens, over the limit of {self.settings.max_prompt_tokens}")
        return ids

    def check_generation(self, ids: list[int], max_new_tokens: int) -> None:
        """What ``generate`` refuses before decoding anything (a stream checks it before its first byte)."""
        if not self.ready:
            raise Unavailable("the server is not ready: the edit log is still being replayed")
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context and len(ids) + max_new_tokens > context:
            raise InvalidRequest(f"max_new_tokens: the prompt ({len(ids)} tokens) plus {max_new_tokens} new tokens "
                              f"exceed the model's context of {context} tokens")

    def generate(self, prompt: str | list[int], max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None, ignore_eos: bool = False,
                 on_token: Callable[[int], None] | None = None,
                 cancel: threading.Event | None = None) -> tuple[str, int]:
        """Continuation of ``prompt`` (text, or token ids already checked: a chat template's output).

        Returns (text without the prompt, number of new tokens). The request is decoded by the batcher
        together with every other one (``service.batching``); this thread waits for it. ``on_token`` is
        called with each new token id as it is decoded (streaming; from the decode thread, so it must only
        hand the id on); setting ``cancel`` takes the request out of the batch at the next step (a client
        that went away), and what was generated so far is returned.
        """
        t0 = time.perf_counter()
        ids = self.check_prompt(prompt) if isinstance(prompt, str) else prompt
        self.check_generation(ids, max_new_tokens)
        request = GenerationRequest(ids, max_new_tokens, 0.0 if temperature < GREEDY_BELOW else temperature, seed,
                                    ignore_eos, on_token, cancel)
        try:
            text, n = self.batcher.submit(request).result()
        except RuntimeError as e:  # the decode loop is stopping
            raise Unavailable(str(e)) from None
        self.metrics.generate_duration.observe(time.perf_counter() - t0)
        self.metrics.generated_tokens.inc(n)
        return text, n

    def _editor_for(self, method: str) -> Editor:
        editor = self.editors.get(method)
        if editor is None:
            reason = self.unavailable.get(method, "it is not configured")
            raise Unavailable(f"method: {method!r} is not available on this server ({reason}); "
                              f"available: {sorted(self.editors) or 'none'}")
        return editor

    def _require_ready(self) -> None:
        # Jobs queued behind a failed replay must not change weights that do not match the log.
        if not self.ready:
            raise Unavailable(self.startup_error or "the server is not ready: the edit log is still being replayed")

    def _notify(self, kind: str, edit_id: int) -> None:
        """Tell replicas the log changed (they also poll it, so this is only about latency)."""
        if self.coordinator is not None:
            self.coordinator.publish(kind, edit_id)
