"""The edit job: validate -> propose -> guard -> take check -> log -> apply -> editor.commit -> record.

``EditSpec`` is a validated request as the API hands it over; ``EditsMixin._edit_job`` runs on the writer thread
(``EditEngine.submit_edit`` queues it). The take check itself is in ``take.py``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from editor_core.capture import EditInputError, teacher_forced
from editor_core.editor import EditRequest, Editor, LocalityPrompt, Proposal
from editor_core.state import DeltaRejected

from .. import crud, db
from ..models import Edit, EditLayer, EditStatus, utcnow
from ..verify import active_digest
from .errors import Conflict, EngineError, InvalidEdit

log = logging.getLogger("hiedit.engine")


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


def _efficacy(before: dict, after: dict, prompts: int, locality_before: float | None,
              locality_after: float | None) -> dict:
    return {"before": before["prob"], "after": after["prob"], "top1_before": before["top1"],
            "top1_after": after["top1"], "metric": "probability of the whole target, mean over prompt and rephrases",
            "prompts": prompts, "locality_before": locality_before, "locality_after": locality_after}


class EditsMixin:
    """Part of :class:`service.engine.engine.EditEngine`: the edit job."""

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
