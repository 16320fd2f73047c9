"""The take check: is an edit kept? (greedy continuations at the edited weights), and its strengthening steps.

``TakeReport`` is what the check found (``efficacy.take`` of an edit, and the 422 of a refusal);
``TakeMixin._make_it_take`` runs it on the writer, under the write lock, with the proposal on trial.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from editor_core.delta import LowRankDelta
from editor_core.editor import EditRequest, Editor, Proposal
from editor_core.hiedit import HiEditor
from editor_core.state import DeltaRejected

from .scoring import _summarise

if TYPE_CHECKING:
    from .edits import EditSpec

# Greedy tokens of a locality prompt that an edit must leave unchanged (more when its target is longer).
LOCALITY_TOKENS = 8


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


class TakeMixin:
    """Part of :class:`service.engine.engine.EditEngine`: the take check and its strengthening steps."""

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
