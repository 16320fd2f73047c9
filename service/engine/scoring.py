"""Scoring on the served weights: teacher-forced passes (argmax and log-probability of a target) and greedy ids.

Every check of an edit (efficacy before and after, the take check, edit retention in the probe report) is one
batched teacher-forced pass: greedy decoding yields the target iff the teacher-forced argmax is the target at
every position. ``_greedy_ids`` is the one place the engine decodes a continuation itself (locality answers,
probes); requests are decoded by the batcher (``service.batching``, through ``EditEngine.generate``).
"""
from __future__ import annotations

import math

import torch

from editor_core.capture import teacher_forced
from editor_core.tensors import right_pad


def _summarise(got: list[tuple[list[int], float]], rows: list[tuple[list[int], list[int]]],
               n_prompts: int) -> tuple[dict, float | None]:
    """(efficacy over the first ``n_prompts`` rows, locality share over the rest) from teacher-forced results."""
    taken = [argmax == want for (argmax, _), (_, want) in zip(got, rows)]
    probs = [math.exp(logp) for _, logp in got[:n_prompts]]
    score = {"prob": sum(probs) / len(probs), "top1": sum(taken[:n_prompts]) / n_prompts}
    kept = taken[n_prompts:]
    return score, (sum(kept) / len(kept) if kept else None)


class ScoringMixin:
    """Part of :class:`service.engine.engine.EditEngine`: teacher-forced scoring and greedy ids."""

    def _scores(self, prompts: list[str], target: str, locality: list[dict]) -> tuple[dict, float | None]:
        """Efficacy on ``prompts`` and locality, from ONE batched teacher-forced pass over the current weights.

        Efficacy: mean probability of the whole target and the share of prompts whose greedy continuation is
        the target (top-1 at every target token). Locality: the share of locality facts whose own target is
        the greedy continuation (None without any). Runs on the writer, the only thread that changes weights.
        """
        rows = self._token_rows([(p, target) for p in prompts] + [(i["prompt"], i["target"]) for i in locality])
        return _summarise(self._teacher_forced(rows), rows, len(prompts))


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
            ids, mask = right_pad(chunk, pad)
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, (prompt, target) in enumerate(rows[start:start + batch]):
                at = logits[row, len(prompt) - 1:len(prompt) - 1 + len(target)].float().cpu()  # [len(target), vocab]
                logp = torch.log_softmax(at, -1).gather(-1, torch.tensor(target)[:, None]).sum()
                out.append((at.argmax(-1).tolist(), float(logp)))
        return out
