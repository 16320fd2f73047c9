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

An unreachable database is a 503 (``Unavailable``), never a hang or a 500: every write job first
asks :class:`service.db.Reachability` (bounded in time) and answers 503 before any work. A write
whose commit fails may still have been committed (the answer was lost with the connection), so
the engine then marks the log *uncertain*, and the next write job first re-reads the applied edits
and brings the weights in line (``_sync_with_log``, the same code that replays the log at start).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import make_url
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from editor_core.capture import EditInputError, teacher_forced
from editor_core.delta import LowRankDelta
from editor_core.editor import EditRequest, Editor, LocalityPrompt, Proposal
from editor_core.hiedit import HiEditor
from editor_core.model import model_id
from editor_core.state import DeltaRejected

from . import crud, db
from .batching import Batcher, GenerationRequest
from .metrics import Metrics
from .models import Edit, EditLayer, EditStatus, Probe, utcnow
from .settings import Settings
from .verify import active_digest
from .weights import LogDeltas, ServedWeights, base_model_fingerprint

log = logging.getLogger("hiedit.engine")


GREEDY_BELOW = 1e-4  # sampling temperatures below this are greedy decoding


# ---- errors the API turns into 4xx/503 -------------------------------------------------------------

class EngineError(Exception):
    """An error with an HTTP status and a message that names the field and the rule."""

    status_code = 400

    def __init__(self, detail: str, status_code: int | None = None, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        if status_code is not None:
            self.status_code = status_code


class InvalidRequest(EngineError):
    """422: a field breaks a rule the schema cannot check (token limits, k, the delta guard)."""

    status_code = 422


InvalidEdit = InvalidRequest


class LogSettingsMismatch(EngineError):
    """503: the edit log was written under editor settings this server does not have (its modules differ)."""

    status_code = 503


class BaseModelMismatch(EngineError):
    """503: the edit log was written for another base model; the server must not start (nothing is replayed)."""

    status_code = 503


class NotFound(EngineError):
    status_code = 404


class Conflict(EngineError):
    status_code = 409


class Unavailable(EngineError):
    status_code = 503


# ---- readers-writer lock ---------------------------------------------------------------------------

class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers so it cannot starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @property
    def writer_waiting(self) -> bool:
        """A writer waits for the readers to leave (the decode loop then admits no new request)."""
        return self._writers_waiting > 0

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ---- results -----------------------------------------------------------------------------------

@dataclass
class EditSpec:
    """A validated edit request as the API hands it to the engine."""

    prompt: str
    target: str
    rephrases: list[str] = field(default_factory=list)
    locality: list[dict] = field(default_factory=list)  # [{"prompt", "target"}]
    method: str = "hiedit"
    k: int | None = None
    subject: str | None = None

    def canonical_hash(self) -> str:
        """sha256 of the request as JSON with sorted keys: what Idempotency-Key compares."""
        body = {"prompt": self.prompt, "target": self.target, "rephrases": self.rephrases,
                "locality": self.locality, "method": self.method, "k": self.k, "subject": self.subject}
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class ProbeReport:
    specificity: float | None
    edit_retention: float | None
    probes: int
    active_edits: int
    evaluated_at: datetime
    fingerprint: str
    changed_probes: list[int]
    lost_edits: list[int]
    duration_s: float

    def as_dict(self) -> dict:
        return {"specificity": self.specificity, "edit_retention": self.edit_retention, "probes": self.probes,
                "active_edits": self.active_edits, "evaluated_at": self.evaluated_at.isoformat(),
                "fingerprint": self.fingerprint, "changed_probes": self.changed_probes,
                "lost_edits": self.lost_edits, "duration_s": round(self.duration_s, 4)}


@dataclass
class TakeReport:
    """Whether an edit takes: greedy continuations at the edited weights (see ``EditEngine._make_it_take``)."""

    prompt: bool
    rephrases: list[bool]
    locality: list[bool]
    continuation: str
    steps: int = 0
    max_steps: int = 0
    max_delta_rel: float = 0.0
    stopped: str = "taken"

    @property
    def taken(self) -> bool:
        return self.prompt and all(self.rephrases) and all(self.locality)

    @property
    def acceptable(self) -> bool:
        """Kept when the prompt takes and no locality answer changed; rephrases that did not take are reported."""
        return self.prompt and all(self.locality)

    def refusal(self, spec: "EditSpec") -> str:
        if self.stopped == "apply":
            return f"apply: {self.continuation}"
        how = {"budget": f"after the proposal and {self.steps} strengthening steps (HIEDIT_EDIT_MAX_STEPS="
                         f"{self.max_steps})",
               "norm_bound": f"after {self.steps} strengthening steps, the next would move a module by more than "
                             "HIEDIT_EDIT_MAX_DELTA_REL of its weight",
               "stateful_editor": "(this method is checked, not strengthened)",
               "locality": f"after {self.steps} strengthening steps"}.get(self.stopped, "")
        if not self.prompt:
            return (f"the greedy continuation of the prompt is {self.continuation!r}, not the target "
                    f"{spec.target.strip()!r}, {how}")
        changed = [i for i, kept in enumerate(self.locality) if not kept]
        return (f"locality{changed} would change its answer ({spec.locality[changed[0]]['prompt']!r} no longer "
                f"continues as before), {how}")

    def as_dict(self) -> dict:
        return {"taken": self.taken, "prompt": self.prompt, "rephrases_taken": sum(self.rephrases),
                "rephrases": len(self.rephrases), "locality_kept": sum(self.locality), "locality": len(self.locality),
                "steps": self.steps, "max_steps": self.max_steps, "max_delta_rel": round(self.max_delta_rel, 6),
                "continuation": self.continuation, "stopped": self.stopped}


def _efficacy(before: dict, after: dict, prompts: int, locality_before: float | None,
              locality_after: float | None) -> dict:
    return {"before": before["prob"], "after": after["prob"], "top1_before": before["top1"],
            "top1_after": after["top1"], "metric": "probability of the whole target, mean over prompt and rephrases",
            "prompts": prompts, "locality_before": locality_before, "locality_after": locality_after}


# Greedy tokens of a locality prompt that an edit must leave unchanged (more when its target is longer).
LOCALITY_TOKENS = 8



# ---- the engine ----------------------------------------------------------------------------------

_STOP = object()


def _summarise(got: list[tuple[list[int], float]], rows: list[tuple[list[int], list[int]]],
               n_prompts: int) -> tuple[dict, float | None]:
    """(efficacy over the first ``n_prompts`` rows, locality share over the rest) from teacher-forced results."""
    taken = [argmax == want for (argmax, _), (_, want) in zip(got, rows)]
    probs = [math.exp(logp) for _, logp in got[:n_prompts]]
    score = {"prob": sum(probs) / len(probs), "top1": sum(taken[:n_prompts]) / n_prompts}
    kept = taken[n_prompts:]
    return score, (sum(kept) / len(kept) if kept else None)


class EditEngine:
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

    def _timer_loop(self) -> None:
        every = self.settings.probe_every_seconds
        while not self._stop.wait(1.0 if not every else min(1.0, every)):
            if every and self.ready and time.monotonic() - self._last_report_t >= every:
                self._queue_report()
            self._maybe_queue_report()  # one the edit count asked for while the duty cap deferred it

    def _maybe_queue_report(self) -> None:
        n = self.settings.probe_every_edits
        if n and self._edits_since_report >= n and time.monotonic() >= self._next_report_at:
            self._queue_report()

    def _queue_report(self) -> None:
        if not self._report_pending.is_set():  # one pending report is enough
            self._report_pending.set()
            self._submit(self._report_job)

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

    def check_prompt(self, prompt: str, field_name: str = "prompt") -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
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

    def add_probe(self, prompt: str, max_new_tokens: int | None) -> Probe:
        if not self.ready:
            raise Unavailable("the server is not ready: the edit log is still being replayed")
        n = max_new_tokens or self.settings.probe_max_new_tokens
        ids = self.check_prompt(prompt)
        with self.lock.read():
            new = self._greedy_ids(ids, n)
            fingerprint = self.state.fingerprint()
        probe = Probe(prompt=prompt, max_new_tokens=n, expected=self.tokenizer.decode(new, skip_special_tokens=True),
                      expected_ids=new, created_at=utcnow(), fingerprint_at_creation=fingerprint)
        with self.sessions.begin() as session:
            crud.add_probe(session, probe)
        return probe

    # ---- writer jobs ---------------------------------------------------------------------------

    def _replay(self) -> int:
        """Apply every active edit of the log, in id order; then turn ready."""
        t0 = time.perf_counter()
        try:
            self.check_base_model()  # before anything is loaded or applied
            self.check_statuses()
            with self.sessions() as session:
                applied = crud.applied_edit_ids(session)
            held = self._load_editor_snapshots(set(applied))
            self._load_weights_checkpoint(applied, held)
            n = self._sync_with_log()
            self.ready = True
            log.info("replayed %d edits in %.2fs; fingerprint %s", n, time.perf_counter() - t0,
                     self.state.fingerprint()[:16])
            return n
        except Exception as e:
            self.startup_error = f"replaying the edit log failed: {e}"
            log.exception("replay failed")
            raise

    def check_statuses(self) -> None:
        """Refuse a log with a status the replay does not know: it would leave that edit out of the weights
        without a word. Migration 0004 refuses to upgrade such a log and its constraint keeps them out since;
        this is for a database whose constraint was dropped or never created."""
        with self.sessions() as session:
            bad = crud.invalid_statuses(session)
        if bad:
            shown = ", ".join(f"edit {i}: {s!r}" for i, s in bad)
            raise LogSettingsMismatch(f"the edit log has rows whose status is none of {', '.join(EditStatus.ALL)} "
                                      f"({shown}); fix them to what they are, then start again; nothing was "
                                      "replayed")

    def check_base_model(self, ids: list[int] | None = None) -> None:
        """BaseModelMismatch if the log (or its edits ``ids``) has edits made on another base model.

        An edit matches when its model name and base fingerprint are this server's; rows logged before
        migration 0003 have no fingerprint and are compared by name only. Runs before the replay (the
        app's lifespan also runs it first, so such a server never starts) and on a replica before it
        applies new edits of the log.
        """
        with self.sessions() as session:
            groups = crud.log_base_models(session, ids)
        foreign = [(model, fp, n) for model, fp, n in groups
                   if model != self.model_name or (fp is not None and fp != self.base_fingerprint)]
        if not foreign:
            return

        def fingerprint(fp: str | None) -> str:
            return f"fingerprint {fp[:12]}…" if fp else "no fingerprint recorded"

        url = make_url(self.settings.resolved_database_url).render_as_string(hide_password=True)
        written = " and ".join(f"{model!r} ({fingerprint(fp)}, {n} edit{'s' * (n != 1)})"
                               for model, fp, n in foreign[:3])
        more = f" and {len(foreign) - 3} other base models" if len(foreign) > 3 else ""
        model = foreign[0][0]
        fix = (f"start with --model {model}" if model != self.model_name else
               f"start with the weights of {model!r} the log was written for (this {model!r} has other weights)")
        raise BaseModelMismatch(
            f"the edit log at {url} was written for base model {written}{more}, but this server runs "
            f"{self.model_name!r} ({fingerprint(self.base_fingerprint)}): {fix}, or use another --database-url / "
            f"HIEDIT_HOME for this model; nothing was replayed")

    # ---- editor state snapshots (RLSEdit's C): a start replays only the recursion since the last one ----

    def _snapshot_path(self, method: str) -> Path:
        return self.settings.home / "state" / f"{method}.safetensors"

    def _load_editor_snapshots(self, applied: set[int]) -> dict[str, set[int]]:
        """Editors that snapshot their state start from their last snapshot; ``restore`` then skips the
        edits it holds, and edits it holds that the log no longer has applied are forgotten. Returns
        {method: ids of applied edits its snapshot holds}."""
        held_by: dict[str, set[int]] = {}
        for method, editor in self.editors.items():
            path = self._snapshot_path(method)
            if not path.is_file():
                continue
            try:
                held = editor.load_state(path)  # changes nothing when it does not fit this editor
            except Exception as e:  # noqa: BLE001 - a stale or foreign snapshot: replay the recursion instead
                log.warning("%s snapshot %s not used (%s); replaying the whole log", method, path, e)
                continue
            stale = sorted((i for i in held if i not in applied), reverse=True)
            blobs = self._state_blobs(stale)
            for edit_id in stale:
                editor.forget(edit_id, blobs.get(edit_id, ("", None))[1])
            held_by[method] = set(held) - set(stale)
            log.info("%s state from %s (%d edits in it, %d since rolled back)", method, path, len(held), len(stale))
        return held_by

    def _load_weights_checkpoint(self, applied: list[int], held: dict[str, set[int]]) -> None:
        """Start the served weights from their newest checkpoint that fits the log, then restore into the
        editors the edits it holds that their own snapshots do not (a missing or older editor snapshot)."""
        covered = self.state.load_checkpoint(applied)
        if not covered:
            return
        blobs = self._state_blobs([i for i in covered])
        for edit_id in covered:
            method, blob = blobs.get(edit_id, ("", None))
            editor = self.editors.get(method)
            if editor is not None and blob is not None and edit_id not in held.get(method, ()):
                editor.restore(edit_id, blob)
        log.info("served weights from a checkpoint of %d edits (%s)", len(covered), self.state.checkpoints[-1].path)

    def _delta_blobs(self, ids: list[int], batch: int = 200) -> Iterator[tuple[int, bytes]]:
        """(id, delta blob) of ``ids`` from the log, in id order, ``batch`` rows at a time (LogDeltas' reader)."""
        for i in range(0, len(ids), batch):
            with self.sessions() as session:
                yield from crud.delta_blobs(session, ids[i:i + batch])

    def _state_blobs(self, ids: list[int], batch: int = 500) -> dict[int, tuple[str, bytes | None]]:
        out: dict[int, tuple[str, bytes | None]] = {}
        for i in range(0, len(ids), batch):
            with self.sessions() as session:
                out.update(crud.state_blobs(session, ids[i:i + batch]))
        return out

    def _save_editor_snapshots(self) -> None:
        """Snapshot the editors' state while it matches the log (on the writer, between jobs)."""
        self._changes_since_snapshot = 0
        if not self.ready or self._log_uncertain:
            return
        for method, editor in self.editors.items():
            try:
                editor.save_state(self._snapshot_path(method))
            except Exception as e:  # noqa: BLE001 - only a slower next start
                log.warning("%s state not snapshotted: %s", method, e)
        try:
            self.state.save_checkpoint()
        except Exception as e:  # noqa: BLE001 - only a slower next start or rollback
            log.warning("served weights not checkpointed: %s", e)

    def _sync_with_log(self) -> int:
        """Make the active edits in memory exactly the log's ``applied`` edits, in id order.

        At start (nothing active) this is the replay. After a write whose commit may or may not
        have happened it repairs the one difference: an edit the log has and the weights lack, or
        the other way round. Edits newer than the oldest one to add are rolled back and re-applied,
        so the weights are always the id-ordered sum (DESIGN §3), as a fresh replay would build them.
        Returns the number of edits applied.
        """
        with self.sessions() as session:
            wanted = crud.applied_edit_ids(session)
        local = self.state.active_ids
        missing = set(wanted) - set(local)
        first_new = min(missing, default=None)
        drop = [i for i in reversed(local) if i not in set(wanted) or (first_new is not None and i > first_new)]
        add = [i for i in wanted if i in missing or i in set(drop)]
        if drop:
            blobs = self._state_blobs(drop)
            for edit_id in drop:
                self.state.rollback(edit_id, swap_lock=self.lock.write())
                method, blob = blobs.get(edit_id, ("", None))
                editor = self.editors.get(method)
                if editor is not None:
                    editor.forget(edit_id, blob)
        applied = 0
        for rows in self.stored_edits(add):
            refused: dict[int, str] = {}
            deltas = []
            for edit, stored in rows:
                try:
                    deltas.append((edit.id, LowRankDelta.from_bytes(stored.blob).to(self.device)))
                except ValueError as e:  # not a delta at all
                    refused[edit.id] = str(e)
            self.check_modules_served(deltas)
            refused.update(self.state.apply_many(deltas, swap_lock=self.lock.write()))  # one swap per batch
            for edit, stored in rows:
                if edit.id in refused:
                    # The weights must match the log: an edit that cannot be applied is marked failed,
                    # which is what a fresh replica would conclude too.
                    log.error("replay: edit %s cannot be applied (%s); marking it failed", edit.id, refused[edit.id])
                    with self.sessions.begin() as session:
                        crud.set_status(session, edit.id, EditStatus.FAILED, error=f"replay: {refused[edit.id]}")
                    continue
                applied += 1
                editor = self.editors.get(edit.method)
                if editor is not None:
                    editor.restore(edit.id, stored.state_blob)
                else:
                    log.warning("replay: edit %s was made with %r, which this server cannot edit with; "
                                "its delta is applied, but new %s edits are refused", edit.id, edit.method,
                                edit.method)
        if drop or add:
            log.info("log sync: %d edits rolled back, %d applied", len(drop), applied)
        self.metrics.active_edits.set(len(self.state.active_ids))
        self._log_uncertain = False
        return applied

    def check_modules_served(self, deltas: list[tuple[int, LowRankDelta]]) -> None:
        """LogSettingsMismatch if applied edits change modules no editor of this server edits.

        Such an edit is sound; it was made under other editor settings (another layer spec, or
        RLSEdit's default layers before 3 Dec on models of <= 8 layers). Marking it failed, as a
        corrupted row is, would drop a user's edit because of a configuration change, so the server
        refuses to start instead and says which settings the log needs.
        """
        served = set(self.state.modules)
        foreign = {eid: sorted(set(d.modules) - served) for eid, d in deltas if not served.issuperset(d.modules)}
        if foreign:
            shown = "; ".join(f"edit {eid}: {', '.join(names)}" for eid, names in list(foreign.items())[:5])
            more = f" (and {len(foreign) - 5} more edits)" if len(foreign) > 5 else ""
            raise LogSettingsMismatch(
                f"the edit log has applied edits that change modules this server does not edit: {shown}{more}. "
                f"They were made under other editor settings; start with those (e.g. --rlsedit-layers for "
                f"RLSEdit, --editor for HiEdit) or roll the edits back from a server that has them. This "
                f"server edits: {', '.join(self.state.modules)}")

    def stored_edits(self, ids: list[int], batch: int = 100):
        """Lists of (Edit, EditDelta) of ``ids`` in id order, ``batch`` rows at a time (deltas can be large)."""
        for i in range(0, len(ids), batch):
            with self.sessions() as session:
                yield crud.edits_with_deltas(session, ids[i:i + batch])

    def _check_log(self, method: str | None) -> None:
        """503 before any work when the log cannot take a write; first repair an uncertain write."""
        if self.coordinator is not None and self.coordinator.regained != self._seen_regained:
            # the writer lock was lost and taken back: another writer may have appended meanwhile
            self._seen_regained, self._log_uncertain = self.coordinator.regained, True
        reason = self.reachability.check()
        if reason is None and self._log_uncertain:
            try:
                self._sync_with_log()
            except Exception as e:  # noqa: BLE001 - still uncertain; say why and retry on the next write
                if not db.is_unavailable(e):
                    raise
                reason = db.describe(e)
        if reason is not None:
            if method is not None:
                self.metrics.edits.labels(method=method, status="error").inc()
            raise Unavailable(f"database: the edit log is unreachable ({reason}); nothing was changed, "
                              "retry later")

    @contextlib.contextmanager
    def _writing_log(self, what: str, method: str | None, uncertain: bool = True) -> Iterator[None]:
        """Turn a lost database into a 503 naming what did not happen; a failed commit may have
        committed after all, so the next write first re-reads the log (``uncertain``)."""
        try:
            yield
        except Exception as e:
            if not db.is_unavailable(e):
                raise
            if uncertain:
                self._log_uncertain = True
            if method is not None:
                self.metrics.edits.labels(method=method, status="error").inc()
            raise Unavailable(f"database: {what} ({db.describe(e)}); retry later (with the same "
                              "Idempotency-Key, a retry never makes a second edit)") from None

    def _editor_for(self, method: str) -> Editor:
        editor = self.editors.get(method)
        if editor is None:
            reason = self.unavailable.get(method, "it is not configured")
            raise Unavailable(f"method: {method!r} is not available on this server ({reason}); "
                              f"available: {sorted(self.editors) or 'none'}")
        return editor

    def _validate(self, spec: EditSpec, editor: Editor) -> int:
        """Check what the request schema cannot: k against the editor, token limits, list sizes."""
        s = self.settings
        n_modules = len(editor.modules)
        k = spec.k if spec.k is not None else int(getattr(getattr(editor, "cfg", None), "k", 0) or n_modules)
        if not 1 <= k <= n_modules:
            raise InvalidEdit(f"k: must be between 1 and {n_modules} (the editable modules of {spec.method}), got {k}")
        if len(spec.rephrases) > s.max_rephrases:
            raise InvalidEdit(f"rephrases: at most {s.max_rephrases} items, got {len(spec.rephrases)}")
        if len(spec.locality) > s.max_locality:
            raise InvalidEdit(f"locality: at most {s.max_locality} items, got {len(spec.locality)}")
        limit = s.max_prompt_tokens
        checks = [("prompt", spec.prompt, spec.target)]
        checks += [(f"rephrases[{i}]", r, spec.target) for i, r in enumerate(spec.rephrases)]
        checks += [(f"locality[{i}]", loc["prompt"], loc["target"]) for i, loc in enumerate(spec.locality)]
        for name, prompt, target in checks:
            try:
                teacher_forced(self.tokenizer, prompt, target, max_prompt_tokens=limit,
                               max_target_tokens=s.max_target_tokens)
            except EditInputError as e:
                msg = str(e)
                # capture names the fields "prompt"/"target": say which list item they belong to
                if name != "prompt":
                    msg = f"{name}.{msg}"
                raise InvalidEdit(msg) from None
        return k

    def _scores(self, prompts: list[str], target: str, locality: list[dict]) -> tuple[dict, float | None]:
        """Efficacy on ``prompts`` and locality, from ONE batched teacher-forced pass over the current weights.

        Efficacy: mean probability of the whole target and the share of prompts whose greedy continuation is
        the target (top-1 at every target token). Locality: the share of locality facts whose own target is
        the greedy continuation (None without any). Runs on the writer, the only thread that changes weights.
        """
        rows = self._token_rows([(p, target) for p in prompts] + [(i["prompt"], i["target"]) for i in locality])
        return _summarise(self._teacher_forced(rows), rows, len(prompts))

    def _require_ready(self) -> None:
        # Jobs queued behind a failed replay must not change weights that do not match the log.
        if not self.ready:
            raise Unavailable(self.startup_error or "the server is not ready: the edit log is still being replayed")

    def _edit_job(self, spec: EditSpec, idempotency_key: str | None, actor: str) -> tuple[Edit, bool]:
        self._require_ready()
        t0 = time.perf_counter()
        self._check_log(spec.method)
        request_hash = spec.canonical_hash()
        if idempotency_key is not None:
            known = self.coordinator.recall_idempotency(idempotency_key) if self.coordinator else None
            with self._writing_log("the Idempotency-Key could not be looked up", spec.method, uncertain=False), \
                    self.sessions() as session:
                prior = crud.get_edit(session, known["edit_id"]) if known else None
                if prior is None or prior.idempotency_key != idempotency_key:  # the log is the authority
                    prior = crud.get_edit_by_key(session, idempotency_key)
            if prior is not None:
                if prior.request_hash != request_hash:
                    raise Conflict(f"Idempotency-Key: {idempotency_key!r} was already used for edit {prior.id} "
                                   "with a different body", edit_id=prior.id)
                return prior, False
        try:
            editor = self._editor_for(spec.method)
            k = self._validate(spec, editor)
            request = EditRequest(spec.prompt, spec.target, list(spec.rephrases),
                                  [LocalityPrompt(loc["prompt"], loc["target"]) for loc in spec.locality],
                                  spec.subject)
            try:
                proposal = editor.propose(request, k)
            except ValueError as e:  # EditInputError names the field; others: the editor cannot make this edit
                raise InvalidEdit(str(e) if isinstance(e, EditInputError) else f"edit rejected by {spec.method}: {e}") from None
            self._guard(proposal)
        except EngineError:
            self.metrics.edits.labels(method=spec.method, status="rejected").inc()
            raise
        prompts = [spec.prompt] + list(spec.rephrases)
        take, refusal = None, None
        if self.settings.edit_check != "off":
            before, locality_before = self._scores(prompts, spec.target, spec.locality)
            # Check that the edit takes (and strengthen it within the budget) before anything is logged.
            proposal, take, scored_after = self._make_it_take(editor, spec, request, k, proposal)
            try:
                self._guard(proposal)
            except EngineError:
                self.metrics.edits.labels(method=spec.method, status="rejected").inc()
                raise
            keep = take.acceptable or (self.settings.edit_check == "report" and take.stopped != "apply")
            refusal = None if keep else take.refusal(spec)

        # Log first: an edit exists only once it is in the database.
        delta = proposal.delta
        layers = []
        for i, name in enumerate(proposal.modules):
            chosen = i in proposal.selected and name in delta.factors
            layers.append(EditLayer(index=i, module=name, importance=float(proposal.importances[i]),
                                    selected=chosen,
                                    delta_norm=delta.frobenius_norm(name) if chosen else 0.0,
                                    rank=delta.rank(name) if chosen else 0))
        edit = Edit(status=EditStatus.APPLIED if refusal is None else EditStatus.FAILED, method=spec.method, model=self.model_name, prompt=spec.prompt,
                    base_fingerprint=self.base_fingerprint,
                    target=spec.target, subject=spec.subject, rephrases=list(spec.rephrases),
                    locality=list(spec.locality), k=k, actor=actor, created_at=utcnow(),
                    loss_before=float(proposal.loss_before), n_tokens=int(proposal.n_tokens),
                    info=_jsonable(proposal.info), idempotency_key=idempotency_key, request_hash=request_hash)
        with self._writing_log("the edit could not be logged, so it was not applied", spec.method), \
                self.sessions.begin() as session:
            if refusal is not None:
                edit.error = refusal if take.stopped == "apply" else f"not taken: {refusal}"
                edit.efficacy = {"take": take.as_dict(), **_efficacy(before, before, len(prompts),
                                                                      locality_before, locality_before)}
            crud.add_edit(session, edit, layers, delta.to_bytes(), proposal.state_blob)
        edit_id = edit.id
        if refusal is not None:  # logged as a failed attempt; weights, editor state and fingerprint untouched
            self.metrics.edits.labels(method=spec.method,
                                      status="failed" if take.stopped == "apply" else "not_taken").inc()
            raise InvalidEdit(f"edit did not take: {refusal}. Nothing was applied; edit {edit_id} records the "
                              f"attempt (status failed)", edit_id=edit_id, take=take.as_dict())

        try:
            self.state.apply(edit_id, delta, swap_lock=self.lock.write())
        except (DeltaRejected, ValueError) as e:
            with self._writing_log(f"edit {edit_id} was logged but could not be applied ({e}), and marking it "
                                   "failed in the log did not succeed", spec.method):
                self._mark_failed(edit_id, f"apply: {e}")
            self.metrics.edits.labels(method=spec.method, status="failed").inc()
            raise InvalidEdit(f"edit {edit_id} was logged but could not be applied and is marked failed: {e}",
                              edit_id=edit_id) from None
        try:
            editor.commit(edit_id, proposal)
        except Exception as e:  # keep log, weights and editor state consistent: undo the apply
            self.state.rollback(edit_id, swap_lock=self.lock.write())
            with self._writing_log(f"edit {edit_id} failed in the {spec.method} editor ({e}) and was undone, "
                                   "but marking it failed in the log did not succeed", spec.method):
                self._mark_failed(edit_id, f"editor.commit: {e}")
            self.metrics.edits.labels(method=spec.method, status="failed").inc()
            raise EngineError(f"edit {edit_id} failed in the {spec.method} editor and was undone: {e}", 500,
                              edit_id=edit_id) from e

        # From here on the edit is logged and applied: it is acknowledged whatever happens to the database.
        self._notify("applied", edit_id)
        if idempotency_key is not None and self.coordinator is not None:
            self.coordinator.remember_idempotency(idempotency_key, edit_id, request_hash)
        efficacy = None  # HIEDIT_EDIT_CHECK=off: nothing was scored
        if take is not None:
            after, locality_after = scored_after  # the take check's last pass ran on exactly these weights
            efficacy = {"take": take.as_dict(), **_efficacy(before, after, len(prompts), locality_before,
                                                            locality_after)}
        latency = time.perf_counter() - t0
        record = {"efficacy": efficacy,
                  "latency_ms": latency * 1000, "fingerprint_after": self.state.fingerprint(),
                  "fingerprint_scheme": self.state.fingerprint_scheme,
                  "active_digest": active_digest(self.state.active_ids)}
        m = self.metrics
        m.edits.labels(method=spec.method, status="applied").inc()
        m.edit_duration.labels(method=spec.method).observe(latency)
        for layer in layers:
            if layer.selected:
                m.layer_selections.labels(module=layer.module).inc()
        m.active_edits.set(len(self.state.active_ids))
        self._edits_since_report += 1
        self._changes_since_snapshot += 1
        try:
            with self.sessions.begin() as session:
                row = session.get(Edit, edit_id)
                for name, value in record.items():
                    setattr(row, name, value)
            self._notify("recorded", edit_id)  # replicas verify their weights against fingerprint_after
            with self.sessions() as session:
                return crud.get_edit(session, edit_id), True
        except Exception as e:
            if not db.is_unavailable(e):
                raise
            # The edit itself is safe in the log; only its scores are not. Answer from memory.
            log.warning("edit %s: efficacy and latency not stored (%s)", edit_id, db.describe(e))
            for name, value in record.items():
                setattr(edit, name, value)
            return edit, True

    def _make_it_take(self, editor: Editor, spec: EditSpec, request: EditRequest, k: int,
                      proposal: Proposal) -> tuple[Proposal, TakeReport, tuple[dict, float | None]]:
        """Check the proposal on the prompt, rephrases and locality prompts; strengthen it if it did not take.

        An edit *takes* when the greedy continuation of its prompt and of each rephrase starts with the
        target, and each locality prompt's greedy answer (over its target's length) is what it was before.
        With the proposal applied on trial, a check is one batched forward pass (greedy decoding yields
        the target iff the teacher-forced argmax is the target at every position). If the edit did not
        take, a *strengthening step* asks the editor again at the edited weights and adds its delta (a
        further MEND-style step: the gradient at θ + ΔW, not a rescaled one): on the first of prompt and
        rephrases that does not continue with the target, or, once they all do, on the first locality
        prompt whose answer changed, toward that answer (the request's locality prompts are constraints
        the edit is steered by, not only scored on). At most ``edit_max_steps`` steps, and never
        beyond ‖ΔW_l‖_F ≤ ρ ‖W⁰_l‖_F (``edit_max_delta_rel``). Steps keep the router's first choice of k
        modules (the audit lists k per edit). Stateful editors (RLSEdit, whose proposal depends on its
        history) are checked, not strengthened.

        The trial weights are swapped in under the write lock (``WeightState.trial``, which restores what
        was served without a rebuild): generation waits for the check (a forward pass per step, plus a
        forward and backward per strengthening step) and never sees a trial.

        Returns the proposal (strengthened or not), the report, and the efficacy and locality scores of
        the last check (``_scores``' figures on the weights the edit will be served with: the same pass
        also scores the locality prompts on their given targets, so no forward pass is repeated).
        """
        s = self.settings
        targets = [(spec.prompt, spec.target)] + [(r, spec.target) for r in spec.rephrases]
        rows = self._token_rows(targets)
        # A locality prompt keeps its answer when its greedy continuation (as long as its target, and at least
        # LOCALITY_TOKENS tokens) is the same with the edit: teacher-forced on today's continuation.
        for prompt, target in self._token_rows([(loc["prompt"], loc["target"]) for loc in spec.locality]):
            n = max(len(target), LOCALITY_TOKENS)
            rows.append((prompt, self._greedy_ids(prompt, n)))
        scored = self._token_rows([(loc["prompt"], loc["target"]) for loc in spec.locality])
        n_check, n_targets = len(rows), len(targets)
        can_step = isinstance(editor, HiEditor)
        delta, steps, n_tokens = proposal.delta, 0, proposal.n_tokens
        with self.lock.write():
            while True:
                try:
                    with self.state.trial(delta):
                        results = self._teacher_forced(rows + scored)
                        got = [argmax for argmax, _ in results[:n_check]]
                        report = self._take_report(spec, rows, got, delta, steps)
                        step = None if report.taken or not can_step or steps >= s.edit_max_steps \
                            else self._next_step(spec, rows, report)
                        more = None if step is None else editor.propose(step, k, selected=proposal.selected)
                except DeltaRejected as e:  # e.g. the edited weight overflows the served dtype
                    return proposal, TakeReport(False, [False] * len(spec.rephrases), [False] * len(spec.locality),
                                                str(e), steps, s.edit_max_steps, stopped="apply"), ({}, None)
                if more is None:
                    report.stopped = ("taken" if report.taken else "stateful_editor" if not can_step
                                      else "budget" if steps >= s.edit_max_steps else "locality")
                    break
                stronger = delta.plus(more.delta)  # the router's k modules: the steps keep proposal.selected
                if any(stronger.frobenius_norm(n) > s.edit_max_delta_rel * self._base_norms[n]
                       for n in more.delta.modules):
                    report.stopped = "norm_bound"
                    break
                delta, steps, n_tokens = stronger, steps + 1, n_tokens + more.n_tokens
        if steps:
            proposal = Proposal(proposal.modules, proposal.importances, proposal.selected, delta,
                                proposal.loss_before, n_tokens, dict(proposal.info), proposal.state_blob)
        target_rows = rows[:n_targets] + scored
        return proposal, report, _summarise(results[:n_targets] + results[n_check:], target_rows, n_targets)

    def _take_report(self, spec: EditSpec, rows: list[tuple[list[int], list[int]]], got: list[list[int]],
                     delta: LowRankDelta, steps: int) -> TakeReport:
        """rows: prompt, rephrases, then locality prompts (with their greedy answers); got: the argmax on them."""
        match = [g == want for g, (_, want) in zip(got, rows)]
        n_targets = 1 + len(spec.rephrases)
        return TakeReport(match[0], match[1:n_targets], match[n_targets:],
                          self.tokenizer.decode(got[0], skip_special_tokens=True), steps, self.settings.edit_max_steps,
                          max((delta.frobenius_norm(n) / self._base_norms[n] for n in delta.modules), default=0.0))

    def _next_step(self, spec: EditSpec, rows: list[tuple[list[int], list[int]]],
                   report: TakeReport) -> EditRequest | None:
        """What the next strengthening step edits: toward the target on the first of prompt and rephrases that
        misses it, else back toward the first changed locality prompt's own answer (None: no such answer)."""
        hits = [report.prompt] + report.rephrases
        if not all(hits):
            return EditRequest(([spec.prompt] + list(spec.rephrases))[hits.index(False)], spec.target,
                               subject=spec.subject)
        i = report.locality.index(False)
        answer = self.tokenizer.decode(rows[len(hits) + i][1], skip_special_tokens=True)
        return EditRequest(spec.locality[i]["prompt"], answer) if answer.strip() else None

    def _token_rows(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(prompt, target) texts -> (prompt ids, target ids) as teacher forcing sees them."""
        rows = []
        for prompt, target in pairs:
            ex = teacher_forced(self.tokenizer, prompt, target, max_prompt_tokens=self.settings.max_prompt_tokens)
            rows.append((ex.input_ids[0, :ex.n_prompt_tokens].tolist(), ex.labels[0, ex.target_positions].tolist()))
        return rows

    def _greedy_ids(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """The greedy continuation of ``ids`` (new token ids). No lock: callers hold what they need."""
        input_ids = torch.tensor([ids], device=self.device)
        with torch.no_grad():
            out = self.model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                      top_k=None, top_p=None, attention_mask=torch.ones_like(input_ids),
                                      pad_token_id=self.tokenizer.pad_token_id)
        return out[0, input_ids.shape[1]:].tolist()

    def _argmax_on_targets(self, rows: list[tuple[list[int], list[int]]]) -> list[list[int]]:
        """For each (prompt ids, target ids): the model's argmax at each target position, teacher-forced.

        It equals the target ids iff greedy decoding continues the prompt with the target.
        """
        return [argmax for argmax, _ in self._teacher_forced(rows)]

    def _teacher_forced(self, rows: list[tuple[list[int], list[int]]],
                        batch: int = 32) -> list[tuple[list[int], float]]:
        """For each (prompt ids, target ids): (argmax at each target position, log P(target | prompt)).

        ``batch`` rows per forward pass, right-padded (causal attention keeps each row's logits its own).
        Runs on the writer, the only thread that changes weights: no lock of its own.
        """
        out: list[tuple[list[int], float]] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(rows), batch):
            chunk = [prompt + target[:-1] for prompt, target in rows[start:start + batch]]
            ids = torch.full((len(chunk), max(map(len, chunk))), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(chunk):
                ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, (prompt, target) in enumerate(rows[start:start + batch]):
                at = logits[row, len(prompt) - 1:len(prompt) - 1 + len(target)].float().cpu()  # [len(target), vocab]
                logp = torch.log_softmax(at, -1).gather(-1, torch.tensor(target)[:, None]).sum()
                out.append((at.argmax(-1).tolist(), float(logp)))
        return out

    def _guard(self, proposal: Proposal) -> None:
        try:
            self.state.validate(proposal.delta)
        except DeltaRejected as e:
            raise InvalidEdit(f"edit rejected by the guard: {e}") from None
        bound = self.settings.delta_norm_bound
        for name in proposal.delta.modules:
            norm = proposal.delta.frobenius_norm(name)
            if not math.isfinite(norm) or norm > bound:
                raise InvalidEdit(f"edit rejected by the guard: the update of {name} has Frobenius norm {norm:.4g}, "
                                  f"over the bound of {bound:g} (HIEDIT_DELTA_NORM_BOUND)")

    def _mark_failed(self, edit_id: int, error: str) -> None:
        with self.sessions.begin() as session:
            crud.set_status(session, edit_id, EditStatus.FAILED, error=error)
        self._notify("failed", edit_id)  # a replica may have applied it from the log already

    def _notify(self, kind: str, edit_id: int) -> None:
        """Tell replicas the log changed (they also poll it, so this is only about latency)."""
        if self.coordinator is not None:
            self.coordinator.publish(kind, edit_id)

    def _rollback_job(self, edit_id: int, actor: str = "anonymous") -> Edit:
        self._require_ready()
        self._check_log(None)
        with self._writing_log(f"edit {edit_id} could not be read", None, uncertain=False), \
                self.sessions() as session:
            edit = crud.get_edit(session, edit_id)
            # read now: the editor forgets the edit's keys after the rollback, when the log may be unreachable
            state_blob = crud.state_blobs(session, [edit_id]).get(edit_id, ("", None))[1]
        if edit is None:
            raise NotFound(f"edit_id: no edit {edit_id}")
        if edit.status == EditStatus.ROLLED_BACK:
            raise Conflict(f"edit_id: edit {edit_id} is already rolled back")
        if edit.status != EditStatus.APPLIED:
            raise Conflict(f"edit_id: edit {edit_id} is {edit.status}: only applied edits can be rolled back")
        # Log first, as for edits: if the process dies right after, the replay leaves the edit out.
        with self._writing_log(f"the rollback of edit {edit_id} could not be logged, so it was not made",
                               edit.method), self.sessions.begin() as session:
            crud.set_status(session, edit_id, EditStatus.ROLLED_BACK)
            session.get(Edit, edit_id).rolled_back_by = actor
        try:
            self.state.rollback(edit_id, swap_lock=self.lock.write())
        except Exception as e:
            with self._writing_log(f"the rollback of edit {edit_id} failed ({e}) and putting the log back "
                                   "did not succeed", edit.method), \
                    self.sessions.begin() as session:  # weights unchanged: put the log back as it was
                row = session.get(Edit, edit_id)
                row.status, row.rolled_back_at, row.rolled_back_by = EditStatus.APPLIED, None, None
            raise EngineError(f"rollback of edit {edit_id} failed, nothing changed: {e}", 500) from e
        try:  # before the notification, so a replica that syncs on it can verify the state at once
            with self.sessions.begin() as session:
                row = session.get(Edit, edit_id)
                row.fingerprint_rolled_back = self.state.fingerprint()
                row.active_digest_rolled_back = active_digest(self.state.active_ids)
        except Exception as e:  # noqa: BLE001 - the rollback stands; replicas only cannot verify this state
            if not db.is_unavailable(e):
                raise
            log.warning("rollback of edit %s: the fingerprint after it was not stored (%s); replicas cannot "
                        "verify this state", edit_id, db.describe(e))
        self._notify("rolled_back", edit_id)
        editor = self.editors.get(edit.method)
        if editor is not None:
            editor.forget(edit_id, state_blob)
        self.metrics.rollbacks.inc()
        self.metrics.edits.labels(method=edit.method, status="rolled_back").inc()
        self.metrics.active_edits.set(len(self.state.active_ids))
        self._edits_since_report += 1
        self._changes_since_snapshot += 1
        try:
            with self.sessions() as session:
                return crud.get_edit(session, edit_id)
        except Exception as e:
            if not db.is_unavailable(e):
                raise
            log.warning("rollback of edit %s: the record could not be re-read (%s)", edit_id, db.describe(e))
            edit.status, edit.rolled_back_at, edit.rolled_back_by = EditStatus.ROLLED_BACK, utcnow(), actor
            return edit

    def _report_job(self) -> ProbeReport:
        """Specificity over the probes and retention over the active edits, at one weight state."""
        self._report_pending.clear()
        t0 = time.perf_counter()
        with self.sessions() as session:
            probes = list(crud.list_probes(session))
            active = crud.applied_facts(session)
        changed = []
        for probe in probes:
            ids = self.tokenizer(probe.prompt, add_special_tokens=True)["input_ids"]
            # on the writer: nobody else changes weights, no lock needed
            if self._greedy_ids(ids, probe.max_new_tokens) != list(probe.expected_ids):
                changed.append(probe.id)
        lost = self._lost_edits(active)
        spec = 1 - len(changed) / len(probes) if probes else None
        ret = 1 - len(lost) / len(active) if active else None
        self.report = ProbeReport(spec, ret, len(probes), len(active), utcnow(), self.state.fingerprint(),
                                  changed, lost, time.perf_counter() - t0)
        self.metrics.specificity.set(float("nan") if spec is None else spec)
        self.metrics.retention.set(float("nan") if ret is None else ret)
        self._edits_since_report = 0
        self._last_report_t = time.monotonic()
        duty = self.settings.probe_max_duty
        self._next_report_at = self._last_report_t + self.report.duration_s * (1 / duty - 1)
        return self.report

    def _lost_edits(self, facts: list[tuple[int, str, str]]) -> list[int]:
        """Ids of the (id, prompt, target) facts whose target is no longer the greedy continuation
        (batched: a report over 1,000 edits is a few dozen forward passes, not 1,000)."""
        rows = self._token_rows([(prompt, target) for _, prompt, target in facts])
        return [edit_id for (edit_id, _, _), got, (_, want) in zip(facts, self._argmax_on_targets(rows), rows)
                if got != want]


def _jsonable(info: dict) -> dict:
    """Proposal.info as JSON: tensors become lists, anything else its str()."""
    def conv(v):
        if isinstance(v, torch.Tensor):
            return v.tolist()
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return str(v)
    return conv(dict(info or {}))
