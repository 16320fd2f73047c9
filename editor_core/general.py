"""General capability of an edited model: the six GLUE/MMLU sets and held-out perplexity.

HiEdit / RLEdit / AlphaEdit measure what sequential editing costs the model outside the edited
facts with the ``glue_eval`` sets (reference §6.4): SST-2, MRPC, CoLA, RTE, NLI (a two-way RTE-style
set, not MNLI) and MMLU, 100 examples each after the 10 rows the code reserves for few-shot use,
asked 0-shot, scored by weighted F1. Here:

    F1_t          sklearn's f1_score(average="weighted") over the task's 100 examples
    F1            the mean of F1_t over the six tasks
    General Retention = 50 · min(1, F1_N / F1_0) + 50 · min(1, PPL_0 / PPL_N)     (percent)

with _0 the unedited model and _N the model after the edits; PPL is the perplexity of held-out
GLUE sentences (evaluate.perplexity). 100 = nothing measurable was lost. A method whose General
Retention is below COLLAPSE_THRESHOLD is *collapsed*: the tables and plots mark it and never rank it.

Departures from glue_eval, and why:
- The answer is the option with the highest log-probability (summed over its tokens) after the
  prompt, not greedy generation of 5 tokens parsed by keyword. glue_eval has this variant too
  (``f1_new``, the mean log-prob of the option tokens). A 135M model's free 0-shot continuation of
  these prompts is mostly no option at all (counted as -1 by the keyword parser), which puts the
  unedited model's F1 at the floor and makes "relative to the unedited model" meaningless.
- Perplexity is half of General Retention. On a model whose F1 is near chance before editing, F1
  cannot fall further when the model is destroyed (a constant answer scores about chance too), so
  F1 alone would call a destroyed model healthy; held-out perplexity sees it.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data import SHARED_DATA, DatasetError
from .tensors import logits_at, right_pad

GLUE_SETS = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")
N_FEW_SHOT_RESERVED = 10      # glue_eval keeps the first 10 rows of each set for few-shot prompts
N_PER_TASK = 100              # glue_eval's number_of_tests
COLLAPSE_THRESHOLD = 80.0     # General Retention below this (percent of the unedited model) = collapsed
MAX_PROMPT_TOKENS = 320       # longer prompts are cut from the left (keeps the question and "Answer:")


@dataclass(frozen=True)
class Choice:
    """One classification example: a prompt, its options (as they continue the prompt) and the gold index."""

    task: str
    prompt: str
    options: tuple[str, ...]
    label: int


def _yes_no(label_yes: bool) -> int:
    return 0 if label_yes else 1


def glue_prompt(task: str, rec: dict) -> Choice:
    """The 0-shot prompt of one record, in glue_eval's wording, with its answer options."""
    if task == "sst2":
        return Choice(task, f"Review : {rec['sentence'].strip()}\nSentiment :", (" positive", " negative"),
                      _yes_no(rec["label"] == 1))
    if task == "cola":
        return Choice(task, f"Is this sentence linguistically acceptable?\nSentence: {rec['sentence'].strip()}\n"
                            "Answer:", (" Yes", " No"), _yes_no(rec["label"] == 1))
    if task == "mrpc":
        return Choice(task, f"Sentence 1: {rec['sentence1'].strip()}\nSentence 2: {rec['sentence2'].strip()}\n"
                            "Do both sentences mean the same thing? Answer:", (" Yes", " No"),
                      _yes_no(rec["label"] == 1))
    if task == "rte":  # GLUE convention: 0 = entailment
        return Choice(task, f"{rec['sentence1'].strip()}\nquestion: {rec['sentence2'].strip()} True or False?\n"
                            "answer:", (" True", " False"), _yes_no(rec["label"] == 0))
    if task == "nli":
        return Choice(task, f"{rec['sentence1'].strip()} entails the {rec['sentence2'].strip()} True or False? "
                            "Answer:", (" True", " False"), _yes_no(rec["label"] == "entailment"))
    if task == "mmlu":
        letters = "ABCD"
        body = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(rec["choices"]))
        return Choice(task, f"{rec['question'].strip()}\n{body}\nAnswer:", tuple(f" {x}" for x in letters),
                      int(rec["answer"]))
    raise ValueError(f"unknown GLUE set {task!r}; known: {GLUE_SETS}")


def load_glue(n_per_task: int = N_PER_TASK, glue_dir: str | Path | None = None,
              tasks: Sequence[str] = GLUE_SETS) -> list[Choice]:
    """The first ``n_per_task`` examples after the reserved few-shot rows of each set, in task order."""
    glue_dir = Path(glue_dir) if glue_dir is not None else SHARED_DATA / "glue"
    out: list[Choice] = []
    for task in tasks:
        path = glue_dir / f"{task}.json"
        try:
            records = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetError(path, None, None, f"not a readable JSON list ({e})") from None
        rows = records[N_FEW_SHOT_RESERVED:N_FEW_SHOT_RESERVED + n_per_task]
        for i, rec in enumerate(rows):
            try:
                out.append(glue_prompt(task, rec))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise DatasetError(path, N_FEW_SHOT_RESERVED + i, None, f"not a {task} record ({e})") from None
    return out


def weighted_f1(pred: Sequence[int], gold: Sequence[int]) -> float:
    """sklearn's f1_score(gold, pred, average="weighted"): per-class F1 weighted by the class's gold count."""
    if len(pred) != len(gold) or not gold:
        raise ValueError("weighted_f1 needs as many predictions as gold labels, and at least one")
    total = 0.0
    for c in set(gold):
        tp = sum(1 for p, g in zip(pred, gold) if p == c and g == c)
        fp = sum(1 for p, g in zip(pred, gold) if p == c and g != c)
        fn = sum(1 for p, g in zip(pred, gold) if p != c and g == c)
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        total += f1 * sum(1 for g in gold if g == c)
    return total / len(gold)


class GlueSet:
    """Tokenized prompts (and prompt ⊕ option rows where an option has several tokens), scored in padded batches.

    When every option of an example is one token (all six sets on the Llama / Gemma tokenizers), the
    example is one row, the prompt, and its options are compared at the prompt's last position: the
    same log-probabilities as one row per option, at a third to a quarter of the cost.
    """

    def __init__(self, tokenizer, examples: Sequence[Choice]):
        if not examples:
            raise ValueError("a GLUE set needs at least one example")
        self.examples = list(examples)
        # (ids, example index, option index or -1 for "all single-token options", n prompt tokens, option ids)
        self.rows: list[tuple[list[int], int, int, int, list[int]]] = []
        for e, ex in enumerate(self.examples):
            prompt = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
            if len(prompt) > MAX_PROMPT_TOKENS:  # keep the BOS token (if any) and the end of the prompt
                prompt = prompt[:1] + prompt[-(MAX_PROMPT_TOKENS - 1):]
            options = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in ex.options]
            if any(not o for o in options):
                raise ValueError(f"{ex.task}: an option tokenizes to no tokens")
            if all(len(o) == 1 for o in options):
                self.rows.append((prompt, e, -1, len(prompt), [o[0] for o in options]))
            else:
                for o, opt in enumerate(options):
                    self.rows.append((prompt + opt, e, o, len(prompt), opt))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def predictions(self, model: nn.Module, batch_size: int = 16) -> list[int]:
        """argmax over options of Σ log p(option token | prompt, earlier option tokens), per example."""
        scores = torch.full((len(self.examples), max(len(x.options) for x in self.examples)), -math.inf)
        order = sorted(range(len(self.rows)), key=lambda i: len(self.rows[i][0]))  # similar lengths together
        for lo in range(0, len(order), batch_size):
            batch = [self.rows[i] for i in order[lo:lo + batch_size]]
            ids, att = right_pad([r[0] for r in batch], self.pad)
            T = ids.shape[1]
            keep = torch.zeros((len(batch), T), dtype=torch.bool)  # the positions that predict an option token
            for j, (row, _e, o, n_prompt, _opt) in enumerate(batch):
                if o < 0:
                    keep[j, n_prompt - 1] = True
                else:
                    keep[j, n_prompt - 1:len(row) - 1] = True
            logp = logits_at(model, ids, att, keep).cpu().log_softmax(-1)  # [P, V], rows of keep in row-major order
            at = 0
            for row, e, o, n_prompt, opt in batch:
                if o < 0:  # one row: every option is one token, read at the prompt's last position
                    scores[e, :len(opt)] = logp[at, torch.tensor(opt)]
                    at += 1
                else:
                    n = len(row) - n_prompt
                    scores[e, o] = float(logp[torch.arange(at, at + n), torch.tensor(opt)].sum())
                    at += n
        return scores.argmax(-1).tolist()

    def f1(self, model: nn.Module, batch_size: int = 16) -> dict[str, float]:
        """{task: weighted F1 in percent} and "mean" (the mean over the tasks present)."""
        pred = self.predictions(model, batch_size)
        out: dict[str, float] = {}
        for task in dict.fromkeys(x.task for x in self.examples):
            idx = [i for i, x in enumerate(self.examples) if x.task == task]
            out[task] = 100.0 * weighted_f1([pred[i] for i in idx], [self.examples[i].label for i in idx])
        out["mean"] = sum(out.values()) / len(out)
        return out


def general_retention(f1_before: float, f1_after: float, ppl_before: float, ppl_after: float) -> float:
    """50 · min(1, F1_N / F1_0) + 50 · min(1, PPL_0 / PPL_N), in percent (module docstring).

    A missing half (NaN: no GLUE sets, or no perplexity text) leaves the other half to stand for the whole.
    """
    parts = []
    if f1_before == f1_before and f1_after == f1_after:
        parts.append(min(1.0, f1_after / f1_before) if f1_before > 0 else 1.0)
    if ppl_before == ppl_before and ppl_after == ppl_after:
        parts.append(min(1.0, ppl_before / ppl_after) if ppl_after > 0 and math.isfinite(ppl_after) else 0.0)
    if not parts:
        return float("nan")
    return 100.0 * sum(parts) / len(parts)


def is_collapsed(general_retention_pct: float) -> bool:
    """General Retention below COLLAPSE_THRESHOLD percent of the unedited model (NaN is not collapse)."""
    return general_retention_pct == general_retention_pct and general_retention_pct < COLLAPSE_THRESHOLD
