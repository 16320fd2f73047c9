"""Specificity probes and the probe report (specificity over the probes, retention over the active edits).

A report runs as a writer job, queued by ``submit_report``, every ``probe_every_seconds`` (the timer thread),
or every ``probe_every_edits`` changes, at most ``probe_max_duty`` of the writer's time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from .. import crud
from ..models import Probe, utcnow
from .errors import Unavailable


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


class ProbesMixin:
    """Part of :class:`service.engine.engine.EditEngine`: probes and the probe report."""

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

    def _report_job(self) -> ProbeReport:
        """Specificity over the probes and retention over the active edits, at one weight state."""
        self._report_pending.clear()
        t0 = time.perf_counter()
        with self.sessions() as session:
            probes = list(crud.list_probes(session))
            active = crud.applied_facts(session)
        changed = []
        for probe in probes:
            ids = self.prompt_ids(probe.prompt)
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
