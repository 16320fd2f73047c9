"""Sequential-editing benchmark: edit N facts one at a time, then score them all.

Protocol (reference §6.1, the paper's "N×1" setting), for every method on the same stream:

    reset the editable weights to W^0                       (WeightState.reset)
    for i, fact in enumerate(stream):                        one fact per edit
        proposal = editor.propose(fact)                      the editor sees the current weights
        state.apply(i + 1, proposal.delta); editor.commit()  timed together: the edit latency
        every M edits (optional): score the facts edited so far
    score every edited fact on the final weights

Metrics, all in percent, each in four scorings (below):

    Efficacy          the edit prompt now gives target_new
    Generalization    the rephrased prompt gives target_new
    Specificity       the locality (neighbourhood) prompt still gives its own answer
    Edited Retention  mean of Efficacy and Generalization over the first 10% of the stream,
                      re-scored at the end (how well early edits survive later ones)
    mean              average of the four above (the paper's summary)
    General Retention 50 · min(1, F1_N / F1_0) + 50 · min(1, PPL_0 / PPL_N) (editor_core.general): the six
                      GLUE/MMLU sets (weighted F1, 100 examples each) and held-out perplexity, relative to
                      the unedited model; reported beside the mean, not in it. Below 80 the method is
                      *collapsed*: marked in every table and plot, never ranked.

Scorings. Every probe is teacher-forced, ``prompt ⊕ target[:-1]``, one forward pass:

    whole object      CounterFact, as ROME / MEMIT / AlphaEdit score it: P(target_new | prompt) against
                      P(target_true | prompt), each the whole object's probability (the mean per-token
                      NLL of its own teacher-forced pass, ROME's ``test_batch_prediction``). Efficacy and
                      Generalization: NLL(new) < NLL(true); Specificity: NLL(true) < NLL(new). Primary.
    per token         the HiEdit code's CounterFact score (reference §6.3): at each of the first
                      min(|new|, |true|) target positions, logit[label] > logit[old label], read from the
                      pass teacher-forced with the label's own prefix. Secondary ("per_token").
    top-1             fraction of target tokens whose argmax is the label: ZsRE's metric (primary there)
                      and the paper's Table 2 re-scoring of CounterFact ("top1").
    generation        what a user sees (LocFT-BF, ICLR 2026): the greedy continuation of the prompt starts
                      with the target (Specificity: the neighbour's continuation starts with its own answer).
                      Read from the teacher-forced pass: greedy decoding produces the target's tokens iff
                      the argmax at every target position is the target's token, so "every position top-1"
                      is exactly greedy generation, without decoding (tests/test_evaluate.py checks it
                      against model.generate). Token-exact: a continuation that spells the target with
                      other tokens does not count ("generation").
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_TARGET_TOKENS, EditInputError, teacher_forced
from .data import EditRecord
from .editor import EditRequest, Editor, LocalityPrompt
from .memit import ValueLog
from .rlsedit import SingularSystemError
from .state import DeltaRejected, WeightState
from .tensors import logits_at, right_pad

log = logging.getLogger("hiedit.eval")

# Exceptions that mean "this method could not make this edit" (not a harness or input error): a delta the
# weight state rejects, or an RLS / AlphaEdit system that is singular.
EDIT_FAILURES = (DeltaRejected, SingularSystemError)

METRICS = ("efficacy", "generalization", "specificity", "edited_retention", "general_retention")
MEAN_OF = ("efficacy", "generalization", "specificity", "edited_retention")


# ---------------------------------------------------------------------------------------------
# Metrics on logits (unit-tested on hand-made tensors)
# ---------------------------------------------------------------------------------------------

def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example fraction of labelled positions whose argmax is the label.

    logits [B, T, V], labels [B, T] (already shifted, -100 = not scored) -> [B] in [0, 1];
    NaN for an example without a labelled position.
    """
    mask = labels != -100
    hit = (logits.argmax(-1) == labels) & mask
    return hit.sum(-1).float() / mask.sum(-1).float()


def new_over_true(logits: torch.Tensor, labels: torch.Tensor, old_labels: torch.Tensor) -> torch.Tensor:
    """Per-example fraction of positions where logit[label] > logit[old_label] (reference §6.3).

    logits [B, T, V]; labels, old_labels [B, T]. A position counts when both labels are set
    (not -100): callers put old labels only on the first min(|new|, |old|) target positions.
    Strict ">": a position where both answers share the token is never a success.
    -> [B] in [0, 1]; NaN for an example without such a position.
    """
    mask = (labels != -100) & (old_labels != -100)
    new = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    old = logits.gather(-1, old_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    hit = (new > old) & mask
    return hit.sum(-1).float() / mask.sum(-1).float()


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean NLL of the labelled tokens: -log of the whole object's per-token probability.

    logits [B, T, V], labels [B, T] (-100 = not scored) -> [B]; NaN for an example without a label.
    ROME / MEMIT / AlphaEdit compare these for the new and the true object (the whole-object scoring).
    """
    mask = labels != -100
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(logp * mask).sum(-1) / mask.sum(-1).float()


def all_top1(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example 1.0 if the argmax is the label at every labelled position (= greedy decoding yields it)."""
    mask = labels != -100
    hit = (logits.argmax(-1) == labels) | ~mask
    return hit.all(-1).float().masked_fill(mask.sum(-1) == 0, float("nan"))


# ---------------------------------------------------------------------------------------------
# Probe sets: many teacher-forced examples, tokenized once, scored in padded batches
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    """Score ``target`` after ``prompt``; ``old_target`` (CounterFact) enables P(new) > P(true)."""

    prompt: str
    target: str
    old_target: str | None = None


@dataclass
class ProbeScores:
    top1: torch.Tensor          # [n] fraction of target tokens predicted top-1
    new_over_true: torch.Tensor  # [n] fraction of paired positions with logit[label] > logit[old]; NaN w/o old
    argmax: torch.Tensor        # [n, T] argmax at every position (for "answer unchanged")
    nll: torch.Tensor           # [n] mean per-token NLL of the target (whole-object scoring)
    greedy: torch.Tensor        # [n] 1.0 if greedy decoding after the prompt starts with the target


class ProbeSet:
    """Tokenized probes in input order, padded to one length T.

    input_ids [n, T], attention [n, T], labels [n, T] and old_labels [n, T] (-100 = not scored).
    """

    def __init__(self, tokenizer, probes: Sequence[Probe], max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                 max_target_tokens: int = DEFAULT_MAX_TARGET_TOKENS):
        if not probes:
            raise ValueError("a probe set needs at least one probe")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        rows = []
        for probe in probes:
            tf = teacher_forced(tokenizer, probe.prompt, probe.target, max_prompt_tokens, max_target_tokens)
            ids, labels = tf.input_ids[0], tf.labels[0]
            old = torch.full_like(labels, -100)
            if probe.old_target:
                tf_old = teacher_forced(tokenizer, probe.prompt, probe.old_target, max_prompt_tokens,
                                        max_target_tokens)
                # The prompt is tokenized alone in both, so the target positions line up.
                start = tf.n_prompt_tokens - 1
                n = min(tf.n_target_tokens, tf_old.n_target_tokens)
                old[start:start + n] = tf_old.labels[0, start:start + n]
            rows.append((ids, labels, old))
        self.input_ids, self.attention = right_pad([r[0] for r in rows], pad)
        self.labels, _ = right_pad([r[1] for r in rows], -100)
        self.old_labels, _ = right_pad([r[2] for r in rows], -100)
        self.lengths = torch.tensor([len(r[0]) for r in rows])

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @torch.no_grad()
    def scores(self, model: nn.Module, limit: int | None = None, batch_size: int = 64) -> ProbeScores:
        """Score the first ``limit`` probes (all by default) on the model's current weights.

        Probes of similar length share a batch (less padding), and the vocabulary projection runs only
        at the target positions (``logits_at``): on SmolLM2 it is a fifth of the forward pass, and the
        prompt positions are most of a probe. ``argmax`` is -1 outside the target positions.
        """
        n = len(self) if limit is None else min(limit, len(self))
        nan = float("nan")
        top1, pnt, nll, greedy = (torch.full((n,), nan) for _ in range(4))
        argmax = torch.full((n, self.input_ids.shape[1]), -1, dtype=torch.long)
        order = sorted(range(n), key=lambda i: (int(self.lengths[i]), i))
        for lo in range(0, n, batch_size):
            rows = torch.tensor(order[lo:lo + batch_size])
            T = int(self.lengths[rows].max())
            labels, old = self.labels[rows, :T], self.old_labels[rows, :T]
            keep = labels != -100
            logits = logits_at(model, self.input_ids[rows, :T], self.attention[rows, :T], keep).cpu()  # [P, V]
            row = keep.nonzero()[:, 0]                    # the batch row of each kept position
            lab, o = labels[keep], old[keep]
            best = logits.argmax(-1)
            hit = (best == lab).float()
            logp = logits.log_softmax(-1).gather(-1, lab[:, None])[:, 0]
            paired = o != -100
            win = (logits.gather(-1, lab[:, None])[:, 0] > logits.gather(-1, o.clamp_min(0)[:, None])[:, 0]) & paired

            def per_row(x: torch.Tensor) -> torch.Tensor:
                return torch.zeros(len(rows)).index_add_(0, row, x.float())

            count, n_paired, hits = per_row(torch.ones_like(hit)), per_row(paired), per_row(hit)
            top1[rows] = hits / count                                  # top1_accuracy
            nll[rows] = -per_row(logp) / count                         # mean_nll
            greedy[rows] = (hits == count).float().masked_fill(count == 0, nan)  # all_top1
            pnt[rows] = per_row(win) / n_paired                        # new_over_true (NaN without old labels)
            am = torch.full((len(rows), T), -1, dtype=torch.long)
            am[keep] = best
            argmax[rows, :T] = am
        return ProbeScores(top1, pnt, argmax, nll, greedy)

    def agreement(self, argmax: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """[n] fraction of target positions whose argmax equals ``reference`` (the pre-edit argmax)."""
        n = argmax.shape[0]
        mask = self.labels[:n] != -100
        same = (argmax == reference[:n]) & mask
        return same.sum(-1).float() / mask.sum(-1).float()


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], max_tokens: int = 64, batch_size: int = 32) -> float:
    """Token-level perplexity of ``texts`` (BOS added, each truncated to ``max_tokens``)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_nll, total_tok = 0.0, 0
    for lo in range(0, len(texts), batch_size):
        enc = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens] for t in texts[lo:lo + batch_size]]
        enc = [e for e in enc if len(e) >= 2]
        if not enc:
            continue
        ids, att = right_pad(enc, pad)
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float().cpu()
        target = ids[:, 1:].masked_fill(att[:, 1:] == 0, -100)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total_nll += float(nll)
        total_tok += int((target != -100).sum())
    if total_tok == 0:
        raise ValueError("perplexity: no text with at least two tokens")
    return math.exp(total_nll / total_tok)


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """How the stream is edited and scored."""

    every: int = 0                    # also score the facts edited so far every M edits (0 = only at the end)
    retention_fraction: float = 0.1   # the first 10% of the stream is re-scored for Edited Retention
    batch_size: int = 64              # probes per scoring forward pass
    ppl_max_tokens: int = 64
    skip_bad: bool = False            # a fact the editor cannot take (EditInputError) is counted and skipped
    progress: bool = True
    seed: int = 0
    glue_every: bool = False          # also score the GLUE sets at every curve point (default: the end only)
    checkpoint_every: int = 100       # with a resume directory: write the method's progress every M edits (0 = never)


# Bumped whenever a change to the scoring changes the numbers: cached rows of an older version are rerun.
SCORE_VERSION = 4


@dataclass
class Bench:
    """Everything scored, tokenized once and shared by all methods.

    stream:      the N facts edited in order
    known:       facts the model knew and that are never edited (known-fact accuracy, reported beside)
    ppl_texts:   held-out general text (General Retention)
    glue:        the GLUE/MMLU examples (General Retention); None = not scored
    """

    model: nn.Module
    tokenizer: object
    stream: list[EditRecord]
    known: list[EditRecord]
    ppl_texts: list[str]
    counterfact: bool
    glue: list | None = None
    edit: ProbeSet = field(init=False)
    rephrase: ProbeSet = field(init=False)
    locality: ProbeSet = field(init=False)
    edit_true: ProbeSet | None = field(init=False)       # CounterFact: the true object after the same prompts
    rephrase_true: ProbeSet | None = field(init=False)
    locality_new: ProbeSet | None = field(init=False)    # the new object after the neighbour's prompt
    known_set: ProbeSet | None = field(init=False)
    glue_set: object = field(init=False)

    def __post_init__(self) -> None:
        cf = self.counterfact
        if not self.stream:
            raise ValueError("the evaluation stream is empty")
        tok, st = self.tokenizer, self.stream
        self.edit = ProbeSet(tok, [Probe(r.prompt, r.target_new, r.target_true if cf else None) for r in st])
        self.rephrase = ProbeSet(tok, [Probe(r.rephrase, r.target_new, r.target_true if cf else None) for r in st])
        # Specificity: the neighbour should keep its own (true) answer over the new one.
        self.locality = ProbeSet(tok, [Probe(r.locality_prompt, r.locality_target, r.target_new if cf else None)
                                       for r in st])
        if cf:  # the other object, teacher-forced with its own tokens (whole-object scoring)
            self.edit_true = ProbeSet(tok, [Probe(r.prompt, r.target_true) for r in st])
            self.rephrase_true = ProbeSet(tok, [Probe(r.rephrase, r.target_true) for r in st])
            self.locality_new = ProbeSet(tok, [Probe(r.locality_prompt, r.target_new) for r in st])
        else:
            self.edit_true = self.rephrase_true = self.locality_new = None
        known = [known_probe(r) for r in self.known]
        self.known_set = ProbeSet(tok, known) if known else None
        if self.glue:
            from .general import GlueSet
            self.glue_set = GlueSet(tok, self.glue)
        else:
            self.glue_set = None


def known_probe(rec: EditRecord) -> Probe:
    """A fact the unedited model should know: CounterFact's true object, else the locality answer."""
    if rec.target_true:
        return Probe(rec.prompt, rec.target_true)
    return Probe(rec.locality_prompt, rec.locality_target)


def request_for(rec: EditRecord) -> EditRequest:
    return EditRequest(prompt=rec.prompt, target=rec.target_new,
                       rephrases=[rec.rephrase] if rec.rephrase else [],
                       locality=[LocalityPrompt(rec.locality_prompt, rec.locality_target)]
                       if rec.locality_prompt else [],
                       subject=rec.subject or None)


@dataclass
class Baseline:
    """What the unedited model scores: the reference for "unchanged" and General Retention."""

    ppl: float
    known_acc: float
    locality_argmax: torch.Tensor
    glue_f1: dict = field(default_factory=dict)   # {task: F1 %, "mean": ...}; empty = not scored


def measure_baseline(bench: Bench, cfg: EvalConfig) -> Baseline:
    loc = bench.locality.scores(bench.model, batch_size=cfg.batch_size)
    ppl = perplexity(bench.model, bench.tokenizer, bench.ppl_texts, cfg.ppl_max_tokens) if bench.ppl_texts else float("nan")
    acc = _known_accuracy(bench, cfg)
    glue = bench.glue_set.f1(bench.model) if bench.glue_set is not None else {}
    return Baseline(ppl, acc, loc.argmax, glue)


def _known_accuracy(bench: Bench, cfg: EvalConfig) -> float:
    if bench.known_set is None:
        return float("nan")
    return float(bench.known_set.scores(bench.model, batch_size=cfg.batch_size).top1.mean())


def _pct(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(100.0 * x.mean()) if x.numel() else float("nan")


SCORINGS = ("whole", "per_token", "top1", "generation")


def score_edited(bench: Bench, n_edited: int, base: Baseline, cfg: EvalConfig,
                 edited_mask: torch.Tensor | None = None, general: bool = True) -> dict:
    """All metrics over the first ``n_edited`` facts of the stream at the current weights.

    ``edited_mask`` [n_edited] marks the facts actually edited (a skipped fact is not scored).
    Returns the primary scoring's metrics at the top level (whole object for CounterFact, top-1 for
    ZsRE), every scoring under its name (SCORINGS; "whole" and "per_token" only for CounterFact),
    "specificity_unchanged", and General Retention with its parts (GLUE F1 per task, perplexity).
    ``general=False`` skips the GLUE sets (General Retention from perplexity alone: a cheap curve point).
    """
    from .general import general_retention, is_collapsed

    model = bench.model
    keep = edited_mask[:n_edited] if edited_mask is not None else torch.ones(n_edited, dtype=torch.bool)
    eff = bench.edit.scores(model, n_edited, cfg.batch_size)
    gen = bench.rephrase.scores(model, n_edited, cfg.batch_size)
    loc = bench.locality.scores(model, n_edited, cfg.batch_size)
    unchanged = bench.locality.agreement(loc.argmax, base.locality_argmax)
    n_ret = max(1, int(math.ceil(cfg.retention_fraction * n_edited)))
    ret_keep = keep.clone()
    ret_keep[n_ret:] = False

    ppl = perplexity(model, bench.tokenizer, bench.ppl_texts, cfg.ppl_max_tokens) if bench.ppl_texts else float("nan")
    acc = _known_accuracy(bench, cfg)
    glue = bench.glue_set.f1(model) if (general and bench.glue_set is not None) else {}
    f1_before = base.glue_f1.get("mean", float("nan")) if glue else float("nan")
    g_ret = general_retention(f1_before, glue.get("mean", float("nan")), base.ppl, ppl)

    def block(e: torch.Tensor, g: torch.Tensor, s: torch.Tensor) -> dict:
        out = {"efficacy": _pct(e[keep]), "generalization": _pct(g[keep]), "specificity": _pct(s[keep]),
               "edited_retention": 0.5 * (_pct(e[ret_keep]) + _pct(g[ret_keep])), "general_retention": g_ret}
        out["mean"] = float(np.mean([out[m] for m in MEAN_OF]))
        return out

    scorings = {"top1": block(eff.top1, gen.top1, loc.top1),
                "generation": block(eff.greedy, gen.greedy, loc.greedy)}
    if bench.counterfact:
        e_true = bench.edit_true.scores(model, n_edited, cfg.batch_size)
        g_true = bench.rephrase_true.scores(model, n_edited, cfg.batch_size)
        l_new = bench.locality_new.scores(model, n_edited, cfg.batch_size)
        # P(new) > P(true) on the whole objects: a lower mean NLL; Specificity the other way round.
        scorings["whole"] = block((eff.nll < e_true.nll).float(), (gen.nll < g_true.nll).float(),
                                  (loc.nll < l_new.nll).float())
        scorings["per_token"] = block(eff.new_over_true, gen.new_over_true, loc.new_over_true)
    primary = "whole" if bench.counterfact else "top1"
    result = dict(scorings[primary])
    result.update({name: scorings[name] for name in SCORINGS if name in scorings})
    result["specificity_unchanged"] = _pct(unchanged[keep])
    result["perplexity"] = ppl
    result["perplexity_ratio"] = ppl / base.ppl if base.ppl == base.ppl and base.ppl > 0 else float("nan")
    result["glue_f1"] = glue
    result["general_retention_parts"] = "GLUE F1 and perplexity" if glue else "perplexity only"
    result["collapsed"] = is_collapsed(g_ret)
    result["known_accuracy"] = 100.0 * acc if acc == acc else acc
    result["n_scored"] = int(keep.sum())
    result["n_retention"] = int(ret_keep.sum())
    return result


def _curve_point(point: dict, edits: int) -> dict:
    return {"edits": edits, **{m: point[m] for m in METRICS},
            **{s: {m: point[s][m] for m in METRICS} for s in SCORINGS if s in point},
            "perplexity": point["perplexity"], "collapsed": point["collapsed"]}


@dataclass
class _Trace:
    """What ``run_method`` gathers along the stream (and a resumed run reads back)."""

    done: int                    # records of the stream consumed (edited, skipped or rejected)
    edited: torch.Tensor         # [N] bool: facts the method edited or tried to (scored)
    latencies: list[float]
    selections: dict[str, int]
    skipped: list[str]
    rejected: list[str]
    curve: list[dict]

    @classmethod
    def fresh(cls, editor: Editor, n: int) -> "_Trace":
        return cls(0, torch.zeros(n, dtype=torch.bool), [], {m: 0 for m in getattr(editor, "modules", [])}, [], [], [])


def _edit_one(editor: Editor, state: WeightState, rec: EditRecord, i: int, k: int | None, cfg: EvalConfig,
              trace: _Trace):
    """Edit stream record ``i``; the proposal, or None when the record was skipped or the method failed."""
    values = getattr(editor, "value_log", None)
    if values is not None:
        values.index = i
    try:
        t0 = time.perf_counter()
        proposal = editor.propose(request_for(rec), k)
        state.apply(i + 1, proposal.delta)
        editor.commit(i + 1, proposal)
        ms = 1000.0 * (time.perf_counter() - t0)
        # A replayed value (memit.ValueLog) skipped the search; the edit's latency is the run's, so its time is added back.
        trace.latencies.append(ms + (proposal.info.get("z_ms", 0.0) if proposal.info.get("z_replayed") else 0.0))
    except EditInputError as exc:
        if not cfg.skip_bad:
            raise EditInputError(f"stream record {i} (case {rec.case_id}): {exc}") from None
        trace.skipped.append(f"record {i} (case {rec.case_id}): {exc}")
        return None
    except EDIT_FAILURES as exc:
        # The method tried and failed (e.g. a non-finite delta): the fact stays in the
        # scores unedited, so the failure costs the method, and the stream goes on.
        trace.rejected.append(f"record {i} (case {rec.case_id}): {exc}")
        trace.edited[i] = True
        return None
    trace.edited[i] = True
    return proposal


PROGRESS_FORMAT = "hiedit-eval-progress-v1"
VALUES_FILE = "values.jsonl"  # memit.ValueLog, in a method's progress directory


def _save_progress(directory: Path, key: str | None, editor: Editor, state: WeightState, trace: _Trace) -> None:
    """Write the method's progress: weights checkpoint and editor state first, then progress.json (atomic),
    which names them; files of the progress before are removed only after (a stop at any point leaves
    one whole progress)."""
    directory.mkdir(parents=True, exist_ok=True)
    state.save_checkpoint()
    editor_file = directory / f"editor-{trace.done:07d}.safetensors"
    editor.save_state(editor_file)  # a stateless editor writes nothing
    payload = {"format": PROGRESS_FORMAT, "key": key, "done": trace.done, "n": len(trace.edited),
               "ids": state.active_ids,
               "editor_state": editor_file.name if editor_file.is_file() else None,
               "rng": torch.get_rng_state().tolist(), "edited": trace.edited.nonzero().flatten().tolist(),
               "latencies": trace.latencies, "selections": trace.selections, "skipped": trace.skipped,
               "rejected": trace.rejected, "curve": trace.curve}
    tmp = directory / "progress.json.tmp"
    tmp.write_text(json.dumps(payload))
    tmp.replace(directory / "progress.json")
    for old in directory.glob("editor-*.safetensors"):
        if old != editor_file:
            old.unlink(missing_ok=True)


def _load_progress(directory: Path, key: str | None, editor: Editor, state: WeightState, n: int) -> _Trace | None:
    """The progress saved in ``directory`` under ``key``, with the weights and the editor's state put back;
    None (nothing changed, the directory cleared) when there is none, or it was made under another key
    or does not load."""
    path = directory / "progress.json"
    if not path.is_file():
        return None
    try:
        p = json.loads(path.read_text())
        if p.get("format") != PROGRESS_FORMAT or p.get("key") != key or key is None:
            raise ValueError("made under other settings")
        if state.load_checkpoint(p["ids"]) != p["ids"]:
            raise ValueError("its weights checkpoint is missing or does not give its fingerprint")
        if p["editor_state"] is not None:
            editor.load_state(directory / p["editor_state"])
    except Exception as exc:  # noqa: BLE001 - a foreign or torn progress only costs the edits it held
        log.warning("progress in %s not used (%s): starting from W^0", directory, exc)
        state.reset()
        for item in directory.iterdir():  # the value log checks its own key (memit.ValueLog)
            if item.name != VALUES_FILE:
                shutil.rmtree(item) if item.is_dir() else item.unlink(missing_ok=True)
        return None
    torch.set_rng_state(torch.tensor(p["rng"], dtype=torch.uint8))
    edited = torch.zeros(n, dtype=torch.bool)
    edited[torch.tensor(p["edited"], dtype=torch.long)] = True
    log.info("resuming from %s: %d records done", directory, p["done"])
    return _Trace(p["done"], edited, p["latencies"], p["selections"], p["skipped"], p["rejected"], p["curve"])


def run_method(bench: Bench, name: str, editor: Editor, state: WeightState, base: Baseline, cfg: EvalConfig,
               k: int | None = None, resume_dir: Path | None = None, resume_key: str | None = None) -> dict:
    """Edit the whole stream with ``editor`` starting from W^0; return its metrics and traces.

    The weights are reset to W^0 before and after, so methods never see each other's edits.
    resume_dir / resume_key: every ``cfg.checkpoint_every`` edits the method's progress (the weights'
    accumulators, the editor's state, the traces and curve so far, the RNG) is written to ``resume_dir``
    under ``resume_key``; a later call with the same key continues after the last one written instead of
    starting from W^0, and ends with the row an uninterrupted run gives (latencies aside). MEMIT-style
    editors also log every edit's target value there (``values.jsonl``, memit.ValueLog): the edits it
    holds past the last progress, or from W^0 when it is the only file left, are replayed without the
    value search. The caller removes ``resume_dir`` once the row is kept.
    """
    state.reset()
    n = len(bench.stream)
    trace = _Trace.fresh(editor, n)
    saved_dir, saved_keep = state.checkpoint_dir, state.keep_checkpoints
    if resume_dir is not None:
        state.checkpoint_dir, state.keep_checkpoints = Path(resume_dir) / "weights", 2
        resumed = _load_progress(Path(resume_dir), resume_key, editor, state, n)
        if resumed is not None:
            trace = resumed
    if resume_dir is not None and resume_key is not None and hasattr(editor, "value_log"):
        # MEMIT-style editors log each edit's target value beside the progress: the edits after the last
        # progress written (or all of them, from W^0, with this file alone) are replayed without the search.
        editor.value_log = ValueLog(Path(resume_dir) / VALUES_FILE, resume_key)
    start = trace.done
    bar = tqdm(bench.stream[start:], desc=f"{name:>13s}", unit="edit", disable=not cfg.progress, leave=True,
               initial=start, total=n)
    try:
        for i, rec in enumerate(bar, start):
            proposal = _edit_one(editor, state, rec, i, k, cfg, trace)
            trace.done = i + 1
            if proposal is not None:
                for m in proposal.selected_modules:
                    trace.selections[m] = trace.selections.get(m, 0) + 1
                if cfg.every and (i + 1) % cfg.every == 0 and i + 1 < n:
                    point = score_edited(bench, i + 1, base, cfg, trace.edited, general=cfg.glue_every)
                    trace.curve.append(_curve_point(point, i + 1))
                    bar.set_postfix(eff=f"{point['efficacy']:.0f}", spe=f"{point['specificity']:.0f}",
                                    gret=f"{point['general_retention']:.0f}")
            if resume_dir is not None and cfg.checkpoint_every and (i + 1) % cfg.checkpoint_every == 0 and i + 1 < n:
                _save_progress(Path(resume_dir), resume_key, editor, state, trace)
        final = score_edited(bench, n, base, cfg, trace.edited)
    finally:
        bar.close()
        if getattr(editor, "value_log", None) is not None:
            if editor.value_log.replayed:
                log.info("%s: %d edits replayed from %s", name, editor.value_log.replayed, editor.value_log.path)
            editor.value_log = None
        state.reset()
        state.checkpoint_dir, state.keep_checkpoints = saved_dir, saved_keep
        if state.fingerprint() != state.base_fingerprint:
            raise RuntimeError(f"{name}: resetting the weights did not restore W^0")
    trace.curve.append(_curve_point(final, n))
    final["edit_latency_ms_p50"] = float(np.median(trace.latencies)) if trace.latencies else 0.0
    final["edit_latency_ms_mean"] = float(np.mean(trace.latencies)) if trace.latencies else 0.0
    final["curve"] = trace.curve
    final["selections"] = trace.selections
    final["n_edits"] = int(trace.edited.sum())
    final["n_skipped"] = len(trace.skipped)
    final["n_rejected"] = len(trace.rejected)
    if trace.skipped:
        final["skipped"] = trace.skipped[:20]
    if trace.rejected:
        final["rejected"] = trace.rejected[:20]
    if k is not None:
        final["k"] = k
    return final


def baseline_summary(bench: Bench, base: Baseline) -> dict:
    return {"perplexity": base.ppl, "known_accuracy": 100.0 * base.known_acc, "n_known": len(bench.known),
            "n_ppl_texts": len(bench.ppl_texts), "glue_f1": base.glue_f1,
            "n_glue": len(bench.glue) if bench.glue else 0}


def run_benchmark(bench: Bench, editors: dict[str, Callable[[], tuple[Editor, int | None]]],
                  states: Callable[[Editor], WeightState], cfg: EvalConfig, cache_dir: Path | None = None,
                  cache_key: Callable[[str], str] | None = None,
                  on_method: Callable[[dict], None] | None = None) -> dict:
    """Run every method on the same stream; returns the results.json payload (without files).

    editors: {name: thunk -> (editor, k)} built lazily so one failing method names itself, and a
             method whose result is cached is never built (no editor trained, no statistics collected).
    states:  editor -> the WeightState over that editor's modules (one per module set).
    cache_dir / cache_key: each finished method's row is written to ``cache_dir/<name>.json`` with
             ``cache_key(name)`` (a digest of everything its scores depend on); a later run with the
             same key takes the row from there instead of editing again, and a method stopped midway
             continues from ``cache_dir/<name>.partial/`` (its progress every ``cfg.checkpoint_every``
             edits, run_method). A stopped run loses at most the edits since the last progress.
    on_method: called with the results so far after every method (to write partial reports).
    """
    torch.manual_seed(cfg.seed)
    base = measure_baseline(bench, cfg)
    scoring = "whole-object P(new) > P(true)" if bench.counterfact else "top-1 token accuracy"
    out: dict = {"n": len(bench.stream), "scoring": scoring, "baseline": baseline_summary(bench, base),
                 "config": asdict(cfg), "methods": {}}
    for name, build in editors.items():
        path = Path(cache_dir) / f"{name}.json" if cache_dir is not None else None
        key = cache_key(name) if cache_key is not None else None
        row = _cached_row(path, key)
        if row is None:
            editor, k = build()
            resume_dir = path.with_suffix(".partial") if path is not None and key is not None else None
            row = run_method(bench, name, editor, states(editor), base, cfg, k, resume_dir, key)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"cache_key": key, "row": row}, indent=1) + "\n")
                tmp.replace(path)  # atomic: a stopped run never leaves half a row
            if resume_dir is not None:
                shutil.rmtree(resume_dir, ignore_errors=True)
        else:
            row = {**row, "from_cache": str(path)}
        out["methods"][name] = row
        if on_method is not None:
            on_method(out)
    return out


def _cached_row(path: Path | None, key: str | None) -> dict | None:
    """The cached row at ``path`` if it was made under the same key; None otherwise."""
    if path is None or key is None or not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cached["row"] if cached.get("cache_key") == key and isinstance(cached.get("row"), dict) else None


# ---------------------------------------------------------------------------------------------
# Reports: markdown table and plots
# ---------------------------------------------------------------------------------------------

def _fmt(x: float) -> str:
    return "n/a" if x is None or x != x else f"{x:.2f}"


SCORING_TITLES = {
    "whole": "whole-object P(new) > P(true) (ROME / MEMIT / AlphaEdit)",
    "per_token": "per-token P(new) > P(true) (the HiEdit code's CounterFact score)",
    "top1": "top-1 token accuracy",
    "generation": "greedy generation: the continuation starts with the target (what a user sees)",
}


def _cell(row: dict, key: str, spread: dict | None) -> str:
    value = _fmt(row.get(key))
    if spread and key in spread:
        lo, hi = spread[key]
        value += f" ({_fmt(lo)}–{_fmt(hi)})"
    return value


def markdown_table(results: dict) -> str:
    """The results as markdown: the primary table, then every other scoring (secondary tables).

    A collapsed method (General Retention below 80% of the unedited model) is marked in every table
    and left out of the "highest mean" line. With replicates every cell is "mean (min–max)".
    """
    from .general import COLLAPSE_THRESHOLD

    methods = results["methods"]
    head = ("| method | Efficacy | Generalization | Specificity | Edited Ret. | mean | General Ret. | PPL × | "
            "edit p50 (ms) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    metric_keys = ("efficacy", "generalization", "specificity", "edited_retention", "mean", "general_retention")

    def name_of(name: str, m: dict) -> str:
        return f"{name} **(collapsed)**" if m.get("collapsed") else name

    def table(block_of) -> list[str]:
        lines = [head]
        for name, m in methods.items():
            row, spread = block_of(m)
            if row is None:
                continue
            cells = [_cell(row, k, spread) for k in metric_keys]
            lines.append(f"| {name_of(name, m)} | " + " | ".join(cells)
                         + f" | {_fmt(m.get('perplexity_ratio'))} | {m.get('edit_latency_ms_p50', 0.0):.1f} |")
        return lines

    reps = results.get("replicates")
    primary = results.get("scoring", "")
    lines = [f"N = {results['n']} sequential edits, primary scoring: {primary} (all values in percent; mean = "
             "average of the first four; General Retention = 50·min(1, F1/F1₀) + 50·min(1, PPL₀/PPL) over the six "
             f"GLUE/MMLU sets and held-out text; a method below {COLLAPSE_THRESHOLD:.0f} is **collapsed**; PPL × = "
             "held-out perplexity relative to the unedited model)"
             + (f"; mean of {reps} replicates, (min–max) over them" if reps else "") + ".", ""]
    lines += table(lambda m: (m, m.get("spread")))
    for scoring in SCORINGS:
        if not any(isinstance(m.get(scoring), dict) for m in methods.values()):
            continue
        if primary.startswith("whole") and scoring == "whole" or primary.startswith("top-1") and scoring == "top1":
            continue  # that is the primary table above
        lines += ["", f"Secondary: {SCORING_TITLES[scoring]}.", ""]
        lines += table(lambda m, s=scoring: (m.get(scoring) if isinstance(m.get(scoring), dict) else None,
                                             (m.get("spread") or {}).get(s)))
    healthy = {n: m for n, m in methods.items() if not m.get("collapsed")}
    collapsed = [n for n, m in methods.items() if m.get("collapsed")]
    if healthy:
        best = max(healthy, key=lambda n: healthy[n]["mean"] if healthy[n]["mean"] == healthy[n]["mean"] else -1)
        lines += ["", f"Highest mean among methods not collapsed: **{best}** ({_fmt(healthy[best]['mean'])})"
                  + (f"; collapsed, so not ranked: {', '.join(collapsed)}." if collapsed else ".")]
    elif collapsed:
        lines += ["", f"Every method is collapsed ({', '.join(collapsed)}): none is ranked."]
    base = results.get("baseline", {})
    f1 = base.get("glue_f1") or {}
    glue = ", ".join(f"{k} {v:.1f}" for k, v in f1.items() if k != "mean")
    lines += ["", f"Before editing: perplexity {base.get('perplexity', float('nan')):.2f} on "
              f"{base.get('n_ppl_texts', 0)} held-out GLUE sentences"
              + (f"; GLUE/MMLU weighted F1 {f1.get('mean', float('nan')):.2f} ({glue}; "
                 f"{base.get('n_glue', 0)} examples)" if f1 else "; GLUE/MMLU sets not scored")
              + (f"; top-1 accuracy {base.get('known_accuracy', float('nan')):.2f}% on {base.get('n_known', 0)} "
                 "unedited known facts" if base.get("n_known") else "") + "."]
    return "\n".join(lines) + "\n"


class MergeError(ValueError):
    """Runs that cannot share one table: another N, scoring, base model or stream."""


# Keys of a results dict that describe one run, not a table merged or averaged from several ("partial": a run
# stopped between methods); merge_results and average_results rebuild or drop them.
_ONE_RUN_KEYS = ("methods", "setup", "partial")


def merge_results(parts: list[dict]) -> dict:
    """One results dict from several runs on the same stream; a later run's row replaces an earlier one's.

    Every method starts from the base weights, so rows of separate runs are comparable when the runs
    agree on N, the scoring, the order of the stream and the before-editing baseline (same model,
    stream, known facts and text).
    ``setup["runs"]`` keeps each run's own setup with the methods taken from it.
    """
    if not parts:
        raise MergeError("nothing to merge")
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        _check_comparable(first, part, i, ("n", "scoring", "order_seed"))  # order_seed: absent = stream order
    methods: dict[str, dict] = {}
    taken_from: dict[str, int] = {}
    for i, part in enumerate(parts):
        for name, row in part["methods"].items():
            methods[name], taken_from[name] = row, i  # a replaced row keeps its place in the table
    runs = [{"methods": [n for n, j in taken_from.items() if j == i], "setup": part.get("setup", {})}
            for i, part in enumerate(parts)]
    return {**{k: v for k, v in first.items() if k not in _ONE_RUN_KEYS},
            "methods": methods, "setup": {"runs": [r for r in runs if r["methods"]]}}


def average_results(parts: list[dict]) -> dict:
    """The mean of several runs of one comparison: the same N facts in other orders, on other thread
    counts, or with editors trained from other seeds. One sequential run is one sample (near-tied
    router choices flip with the summation order, and each training seed learns another router), so a
    comparison between methods is read on the mean of several.

    Every number of a method's row is averaged over the runs (curves point by point); ``spread``
    gives the [min, max] over the runs of each table metric. Only methods present in every run are
    kept. Runs must agree on N, the scoring and the baseline, and on the set of facts where every
    run records its stream (``setup.stream``). A part that is itself a mean (``replicates`` = r) counts
    as its r runs: weight r in the mean, its ``spread`` in the range, so a third seed can be added to
    the published mean of two without the two runs' own files.
    """
    weights = [int(p.get("replicates", 1)) for p in parts]
    if sum(weights) < 2:
        raise MergeError("averaging needs at least two runs")
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        _check_comparable(first, part, i, ("n", "scoring"))
    run_setups = [r for p in parts for r in (p.get("setup", {}).get("runs", []) if "replicates" in p
                                             else [p.get("setup", {})])]
    streams = [r.get("stream") for r in run_setups]
    if all(streams) and any(sorted(s) != sorted(streams[0]) for s in streams):
        raise MergeError("the runs edited different facts (setup.stream): averaging needs the same facts")
    names = [n for n in first["methods"] if all(n in p["methods"] for p in parts)]
    if not names:
        raise MergeError("no method is in every run")

    def low_high(row: dict, scoring: str | None, key: str) -> tuple[float, float]:
        spread = row.get("spread", {})
        spread = spread.get(scoring, {}) if scoring else spread
        value = row[scoring][key] if scoring else row[key]
        return tuple(spread.get(key, (value, value)))

    methods = {}
    for name in names:
        rows = [p["methods"][name] for p in parts]
        spread = {k: [min(low_high(r, None, k)[0] for r in rows), max(low_high(r, None, k)[1] for r in rows)]
                  for k in (*METRICS, "mean")}
        for scoring in SCORINGS:
            if all(isinstance(r.get(scoring), dict) for r in rows):
                spread[scoring] = {k: [min(low_high(r, scoring, k)[0] for r in rows),
                                       max(low_high(r, scoring, k)[1] for r in rows)] for k in (*METRICS, "mean")}
        row = _mean_of([{k: v for k, v in r.items() if k != "spread"} for r in rows], weights)
        # Collapsed in any replicate is collapsed: a mean must not hide one destroyed model.
        row["collapsed"] = any(r.get("collapsed") for r in rows)
        methods[name] = {**row, "spread": spread}
    return {**{k: v for k, v in first.items() if k not in (*_ONE_RUN_KEYS, "order_seed", "replicates")},
            "methods": methods, "replicates": sum(weights), "setup": {"runs": run_setups}}


def _check_comparable(first: dict, part: dict, i: int, keys: tuple[str, ...]) -> None:
    for key in keys:
        if part.get(key) != first.get(key):
            raise MergeError(f"run {i} has another {key} than run 0: {part.get(key)!r} vs {first.get(key)!r}")
    if not _same_baseline(part.get("baseline", {}), first.get("baseline", {})):
        raise MergeError(f"run {i} has another before-editing baseline than run 0 (another model, stream "
                         f"or probe set?): {part.get('baseline')!r} vs {first.get('baseline')!r}")


def _mean_of(values: list, weights: list[int] | None = None):
    """Element-wise (weighted) mean of equally shaped JSON values; equal non-numbers are kept, unequal ones dropped."""
    weights = weights or [1] * len(values)
    v0 = values[0]
    if isinstance(v0, dict):
        return {k: _mean_of([v[k] for v in values], weights)
                for k in v0 if all(isinstance(v, dict) and k in v for v in values)}
    if isinstance(v0, list):
        if all(isinstance(v, list) and len(v) == len(v0) for v in values):
            return [_mean_of(list(items), weights) for items in zip(*values)]
        return []
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return v0 if all(v == v0 for v in values) else sum(w * v for w, v in zip(weights, values)) / sum(weights)
    return v0 if all(v == v0 for v in values) else None


def _same_baseline(a: dict, b: dict, rtol: float = 1e-5) -> bool:
    """Equal keys and counts; floats (perplexity sums in another order on another run) within rtol."""
    if a.keys() != b.keys():
        return False

    def same(x, y) -> bool:
        if isinstance(x, dict) and isinstance(y, dict):
            return _same_baseline(x, y, rtol)
        if isinstance(x, float) or isinstance(y, float):
            return (x != x and y != y) or math.isclose(x, y, rel_tol=rtol)
        return x == y

    return all(same(a[k], b[k]) for k in a)


def write_reports(results: dict, out) -> str:
    """results.json, results.md and the two plots into ``out``; returns the markdown table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    (out / "results.md").write_text(table)
    plot_curves(results, out / "metrics_vs_edits.png")
    plot_selections(results, out / "module_selection.png")
    return table


def plot_curves(results: dict, path) -> None:
    """Each metric against the number of edits, one line per method (primary scoring, plus greedy generation).

    The General Retention panel draws the collapse threshold; a collapsed method's lines are dashed
    and its legend entry says "collapsed".
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .general import COLLAPSE_THRESHOLD

    panels = [(m, None) for m in METRICS] + [("efficacy", "generation"), ("specificity", "generation")]
    fig, grid = plt.subplots(2, 4, figsize=(16, 7))
    axes = grid.ravel()
    for name, m in results["methods"].items():
        curve = m.get("curve") or []
        xs = [p["edits"] for p in curve]
        style = dict(marker="o", ms=3, ls="--" if m.get("collapsed") else "-",
                     label=f"{name} (collapsed)" if m.get("collapsed") else name)
        for ax, (metric, scoring) in zip(axes, panels):
            ys = [(p.get(scoring) or {}).get(metric, float("nan")) if scoring else p.get(metric, float("nan"))
                  for p in curve]
            ax.plot(xs, ys, **style)
    for ax, (metric, scoring) in zip(axes, panels):
        ax.set_title(metric.replace("_", " ") + (f" ({scoring})" if scoring else ""), fontsize=10)
        if metric == "general_retention" and not scoring and not results.get("config", {}).get("glue_every"):
            ax.set_title("general retention\n(last point: F1 + PPL; earlier: PPL only)", fontsize=9)
        ax.set_xlabel("edits")
        ax.set_ylabel("%")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        if metric == "general_retention":
            ax.axhline(COLLAPSE_THRESHOLD, color="red", lw=1, ls=":", label="collapse threshold")
    handles, labels = axes[METRICS.index("general_retention")].get_legend_handles_labels()
    axes[-1].axis("off")  # the last panel holds the legend
    axes[-1].legend(handles, labels, loc="center", fontsize=9)
    fig.suptitle(f"Sequential editing, N = {results['n']} (primary scoring: {results.get('scoring', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_selections(results: dict, path) -> None:
    """How often each module is selected, per method (the paper's Figure 6), as a heatmap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {n: m for n, m in results["methods"].items() if m.get("selections") and m.get("n_edits")}
    fig_h = 1.0 + 0.45 * max(1, len(rows))
    if not rows:
        fig, ax = plt.subplots(figsize=(6, fig_h))
        ax.text(0.5, 0.5, "no method selected modules", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return
    modules: list[str] = []
    for m in rows.values():
        modules += [x for x in m["selections"] if x not in modules]
    grid = np.array([[100.0 * m["selections"].get(x, 0) / m["n_edits"] for x in modules] for m in rows.values()])
    short = [_short_module(x) for x in modules]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(modules) + 2), fig_h + 0.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(modules)), short, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if grid[i, j] < 60 else "black")
    fig.colorbar(im, ax=ax, label="% of edits selecting the module")
    ax.set_title(f"Module selection frequency over {results['n']} edits")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _short_module(name: str) -> str:
    """model.layers.11.mlp.gate_proj -> gate11."""
    parts = name.split(".")
    try:
        layer = next(p for p in parts if p.isdigit())
        return parts[-1].replace("_proj", "") + layer
    except StopIteration:
        return name
