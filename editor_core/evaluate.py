"""Sequential-editing benchmark: edit N facts one at a time, then score them all.

Protocol (reference §6.1, the paper's "N×1" setting), for every method on the same stream:

    reset the editable weights to W^0                       (WeightState.reset)
    for i, fact in enumerate(stream):                        one fact per edit
        proposal = editor.propose(fact)                      the editor sees the current weights
        state.apply(i + 1, proposal.delta); editor.commit()  timed together: the edit latency
        every M edits (optional): score the facts edited so far
    score every edited fact on the final weights

Metrics, all in percent (reference §6.2-6.3):

    Efficacy          the edit prompt now gives target_new
    Generalization    the rephrased prompt gives target_new
    Specificity       the locality (neighbourhood) prompt still gives its own answer
    Edited Retention  mean of Efficacy and Generalization over the first 10% of the stream,
                      re-scored at the end (how well early edits survive later ones)
    General Retention 50 · min(1, PPL_0 / PPL_N) + 50 · min(1, Acc_N / Acc_0)
                      PPL: perplexity of held-out GLUE sentences; Acc: top-1 token accuracy of
                      known facts that are not edited (target_true of CounterFact records outside
                      the stream). 100 = nothing measurable was lost; each half drops in
                      proportion to the loss. Capped at 100: an edit cannot earn credit by
                      improving an unrelated fact.
    mean              average of the first four (the paper's summary; General Retention is
                      reported beside it, not in it)

Scoring. Every probe is one teacher-forced forward pass ``prompt ⊕ target[:-1]``:

    top-1 accuracy    fraction of target tokens whose argmax is the label (ZsRE's metric,
                      and the paper's Table 2 re-scoring of CounterFact)
    P(new) > P(true)  CounterFact (§6.3): at each of the first min(|new|, |true|) target positions,
                      is logit[label] > logit[old label]? Efficacy/Generalization: label = new,
                      old = true; Specificity: label = true, old = new. Read from one pass that
                      is teacher-forced with the label's own prefix.

CounterFact is scored primarily by P(new) > P(true) (the top-1 variants are kept under "top1");
ZsRE, which has no old answer, by top-1 accuracy.
"""
from __future__ import annotations

import json
import math
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
from .state import DeltaRejected, WeightState


def _edit_failures() -> tuple[type[Exception], ...]:
    """Exceptions that mean "this method could not make this edit" (not a harness or input error)."""
    failures: list[type[Exception]] = [DeltaRejected]
    try:  # RLSEdit is optional; its numerical failure is a failed edit like a rejected delta
        from .rlsedit import SingularSystemError
        failures.append(SingularSystemError)
    except ImportError:
        pass
    return tuple(failures)

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


def general_retention(ppl_before: float, ppl_after: float, acc_before: float, acc_after: float) -> float:
    """The single General Retention percentage (module docstring): 50·min(1, P0/P) + 50·min(1, A/A0)."""
    ppl_part = min(1.0, ppl_before / ppl_after) if ppl_after > 0 and math.isfinite(ppl_after) else 0.0
    acc_part = min(1.0, acc_after / acc_before) if acc_before > 0 else 1.0
    return 50.0 * ppl_part + 50.0 * acc_part


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
        T = max(len(r[0]) for r in rows)
        n = len(rows)
        self.input_ids = torch.full((n, T), pad, dtype=torch.long)
        self.attention = torch.zeros((n, T), dtype=torch.long)
        self.labels = torch.full((n, T), -100, dtype=torch.long)
        self.old_labels = torch.full((n, T), -100, dtype=torch.long)
        self.lengths = torch.tensor([len(r[0]) for r in rows])
        for i, (ids, labels, old) in enumerate(rows):  # right padding: causal logits of real tokens are unchanged
            self.input_ids[i, :len(ids)] = ids
            self.attention[i, :len(ids)] = 1
            self.labels[i, :len(ids)] = labels
            self.old_labels[i, :len(ids)] = old

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @torch.no_grad()
    def scores(self, model: nn.Module, limit: int | None = None, batch_size: int = 64) -> ProbeScores:
        """Score the first ``limit`` probes (all by default) on the model's current weights."""
        n = len(self) if limit is None else min(limit, len(self))
        device = next(model.parameters()).device
        top1, pnt, argmax = [], [], []
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            T = int(self.lengths[lo:hi].max())
            logits = model(input_ids=self.input_ids[lo:hi, :T].to(device),
                           attention_mask=self.attention[lo:hi, :T].to(device)).logits.float().cpu()
            labels, old = self.labels[lo:hi, :T], self.old_labels[lo:hi, :T]
            top1.append(top1_accuracy(logits, labels))
            pnt.append(new_over_true(logits, labels, old))
            am = torch.full((hi - lo, self.input_ids.shape[1]), -1, dtype=torch.long)
            am[:, :T] = logits.argmax(-1)
            argmax.append(am)
        return ProbeScores(torch.cat(top1), torch.cat(pnt), torch.cat(argmax))

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
        T = max(len(e) for e in enc)
        ids = torch.full((len(enc), T), pad, dtype=torch.long)
        att = torch.zeros((len(enc), T), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, :len(e)] = torch.tensor(e)
            att[i, :len(e)] = 1
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


@dataclass
class Bench:
    """Everything scored, tokenized once and shared by all methods.

    stream:      the N facts edited in order
    known:       facts the model knew and that are never edited (General Retention)
    ppl_texts:   held-out general text (General Retention)
    """

    model: nn.Module
    tokenizer: object
    stream: list[EditRecord]
    known: list[EditRecord]
    ppl_texts: list[str]
    counterfact: bool
    edit: ProbeSet = field(init=False)
    rephrase: ProbeSet = field(init=False)
    locality: ProbeSet = field(init=False)
    known_set: ProbeSet | None = field(init=False)

    def __post_init__(self) -> None:
        cf = self.counterfact
        if not self.stream:
            raise ValueError("the evaluation stream is empty")
        self.edit = ProbeSet(self.tokenizer, [Probe(r.prompt, r.target_new, r.target_true if cf else None)
                                              for r in self.stream])
        self.rephrase = ProbeSet(self.tokenizer, [Probe(r.rephrase, r.target_new, r.target_true if cf else None)
                                                  for r in self.stream])
        # Specificity: the neighbour should keep its own (true) answer over the new one.
        self.locality = ProbeSet(self.tokenizer, [Probe(r.locality_prompt, r.locality_target,
                                                        r.target_new if cf else None) for r in self.stream])
        known = [known_probe(r) for r in self.known]
        self.known_set = ProbeSet(self.tokenizer, known) if known else None


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


def measure_baseline(bench: Bench, cfg: EvalConfig) -> Baseline:
    loc = bench.locality.scores(bench.model, batch_size=cfg.batch_size)
    ppl = perplexity(bench.model, bench.tokenizer, bench.ppl_texts, cfg.ppl_max_tokens) if bench.ppl_texts else float("nan")
    acc = _known_accuracy(bench, cfg)
    return Baseline(ppl, acc, loc.argmax)


def _known_accuracy(bench: Bench, cfg: EvalConfig) -> float:
    if bench.known_set is None:
        return float("nan")
    return float(bench.known_set.scores(bench.model, batch_size=cfg.batch_size).top1.mean())


def _pct(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(100.0 * x.mean()) if x.numel() else float("nan")


def score_edited(bench: Bench, n_edited: int, base: Baseline, cfg: EvalConfig,
                 edited_mask: torch.Tensor | None = None) -> dict:
    """All metrics over the first ``n_edited`` facts of the stream at the current weights.

    ``edited_mask`` [n_edited] marks the facts actually edited (a skipped fact is not scored).
    Returns the primary metrics at the top level and the other scorings under "top1" and
    "specificity_unchanged".
    """
    model = bench.model
    keep = edited_mask[:n_edited] if edited_mask is not None else torch.ones(n_edited, dtype=torch.bool)
    eff = bench.edit.scores(model, n_edited, cfg.batch_size)
    gen = bench.rephrase.scores(model, n_edited, cfg.batch_size)
    loc = bench.locality.scores(model, n_edited, cfg.batch_size)
    unchanged = bench.locality.agreement(loc.argmax, base.locality_argmax)
    n_ret = max(1, int(math.ceil(cfg.retention_fraction * n_edited)))
    ret_keep = keep.clone()
    ret_keep[n_ret:] = False

    def pick(scores: ProbeScores) -> torch.Tensor:
        return scores.new_over_true if bench.counterfact else scores.top1

    ppl = perplexity(model, bench.tokenizer, bench.ppl_texts, cfg.ppl_max_tokens) if bench.ppl_texts else float("nan")
    acc = _known_accuracy(bench, cfg)
    g_ret = general_retention(base.ppl, ppl, base.known_acc, acc) if bench.ppl_texts else \
        (100.0 * min(1.0, acc / base.known_acc) if base.known_acc > 0 else float("nan"))

    def block(e: torch.Tensor, g: torch.Tensor, s: torch.Tensor) -> dict:
        out = {"efficacy": _pct(e[keep]), "generalization": _pct(g[keep]), "specificity": _pct(s[keep]),
               "edited_retention": 0.5 * (_pct(e[ret_keep]) + _pct(g[ret_keep])), "general_retention": g_ret}
        out["mean"] = float(np.mean([out[m] for m in MEAN_OF]))
        return out

    result = block(pick(eff), pick(gen), pick(loc))
    result["top1"] = block(eff.top1, gen.top1, loc.top1)
    result["specificity_unchanged"] = _pct(unchanged[keep])
    result["perplexity"] = ppl
    result["known_accuracy"] = 100.0 * acc if acc == acc else acc
    result["n_scored"] = int(keep.sum())
    result["n_retention"] = int(ret_keep.sum())
    return result


def run_method(bench: Bench, name: str, editor: Editor, state: WeightState, base: Baseline, cfg: EvalConfig,
               k: int | None = None) -> dict:
    """Edit the whole stream with ``editor`` starting from W^0; return its metrics and traces.

    The weights are reset to W^0 before and after, so methods never see each other's edits.
    """
    state.reset()
    failures = _edit_failures()
    n = len(bench.stream)
    latencies: list[float] = []
    selections: dict[str, int] = {m: 0 for m in getattr(editor, "modules", [])}
    edited = torch.zeros(n, dtype=torch.bool)
    skipped: list[str] = []
    rejected: list[str] = []
    curve: list[dict] = []
    bar = tqdm(bench.stream, desc=f"{name:>13s}", unit="edit", disable=not cfg.progress, leave=True)
    try:
        for i, rec in enumerate(bar):
            try:
                t0 = time.perf_counter()
                proposal = editor.propose(request_for(rec), k)
                state.apply(i + 1, proposal.delta)
                editor.commit(i + 1, proposal)
                latencies.append(1000.0 * (time.perf_counter() - t0))
            except EditInputError as exc:
                if not cfg.skip_bad:
                    raise EditInputError(f"stream record {i} (case {rec.case_id}): {exc}") from None
                skipped.append(f"record {i} (case {rec.case_id}): {exc}")
                continue
            except failures as exc:
                # The method tried and failed (e.g. a non-finite delta): the fact stays in the
                # scores unedited, so the failure costs the method, and the stream goes on.
                rejected.append(f"record {i} (case {rec.case_id}): {exc}")
                edited[i] = True
                continue
            edited[i] = True
            for m in proposal.selected_modules:
                selections[m] = selections.get(m, 0) + 1
            if cfg.every and (i + 1) % cfg.every == 0 and i + 1 < n:
                point = score_edited(bench, i + 1, base, cfg, edited)
                curve.append({"edits": i + 1, **{m: point[m] for m in METRICS}})
                bar.set_postfix(eff=f"{point['efficacy']:.0f}", spe=f"{point['specificity']:.0f}")
        final = score_edited(bench, n, base, cfg, edited)
    finally:
        bar.close()
        state.reset()
        if state.fingerprint() != state.base_fingerprint:
            raise RuntimeError(f"{name}: resetting the weights did not restore W^0")
    curve.append({"edits": n, **{m: final[m] for m in METRICS}})
    final["edit_latency_ms_p50"] = float(np.median(latencies)) if latencies else 0.0
    final["edit_latency_ms_mean"] = float(np.mean(latencies)) if latencies else 0.0
    final["curve"] = curve
    final["selections"] = selections
    final["n_edits"] = int(edited.sum())
    final["n_skipped"] = len(skipped)
    final["n_rejected"] = len(rejected)
    if skipped:
        final["skipped"] = skipped[:20]
    if rejected:
        final["rejected"] = rejected[:20]
    if k is not None:
        final["k"] = k
    return final


def run_benchmark(bench: Bench, editors: dict[str, Callable[[], tuple[Editor, int | None]]],
                  states: Callable[[Editor], WeightState], cfg: EvalConfig) -> dict:
    """Run every method on the same stream; returns the results.json payload (without files).

    editors: {name: thunk -> (editor, k)} built lazily so one failing method names itself.
    states:  editor -> the WeightState over that editor's modules (one per module set).
    """
    torch.manual_seed(cfg.seed)
    base = measure_baseline(bench, cfg)
    out: dict = {"n": len(bench.stream), "scoring": "P(new)>P(true) per token" if bench.counterfact else "top-1",
                 "baseline": {"perplexity": base.ppl, "known_accuracy": 100.0 * base.known_acc,
                              "n_known": len(bench.known), "n_ppl_texts": len(bench.ppl_texts)},
                 "config": asdict(cfg), "methods": {}}
    for name, build in editors.items():
        editor, k = build()
        out["methods"][name] = run_method(bench, name, editor, states(editor), base, cfg, k)
    return out


# ---------------------------------------------------------------------------------------------
# Reports: markdown table and plots
# ---------------------------------------------------------------------------------------------

def _fmt(x: float) -> str:
    return "n/a" if x is None or x != x else f"{x:.2f}"


def markdown_table(results: dict) -> str:
    """The results as markdown: the primary table, then the top-1 re-scoring (CounterFact)."""
    head = ("| method | Efficacy | Generalization | Specificity | Edited Ret. | General Ret. | mean | "
            "edit p50 (ms) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"N = {results['n']} sequential edits, scored by {results.get('scoring', '')} "
             "(all values in percent; mean = average of the first four).\n", head.rstrip("\n")]
    for name, m in results["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m[k]) for k in (*METRICS, "mean"))
                     + f" | {m['edit_latency_ms_p50']:.1f} |")
    if results.get("scoring", "").startswith("P(new)"):
        lines += ["", "The same runs re-scored by top-1 token accuracy:", "", head.rstrip("\n")]
        for name, m in results["methods"].items():
            t = m["top1"]
            lines.append(f"| {name} | " + " | ".join(_fmt(t[k]) for k in (*METRICS, "mean"))
                         + f" | {m['edit_latency_ms_p50']:.1f} |")
    if results.get("replicates"):
        lines += ["", f"Mean of {results['replicates']} runs of the same facts; the mean's range over the runs: "
                  + ", ".join(f"{name} {_fmt(m['spread']['mean'][0])}–{_fmt(m['spread']['mean'][1])}"
                              for name, m in results["methods"].items()) + "."]
    base = results.get("baseline", {})
    lines += ["", f"Before editing: perplexity {base.get('perplexity', float('nan')):.2f} on "
              f"{base.get('n_ppl_texts', 0)} held-out GLUE sentences, top-1 accuracy "
              f"{base.get('known_accuracy', float('nan')):.2f}% on {base.get('n_known', 0)} unedited known facts."]
    return "\n".join(lines) + "\n"


class MergeError(ValueError):
    """Runs that cannot share one table: another N, scoring, base model or stream."""


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
    return {**{k: v for k, v in first.items() if k not in ("methods", "setup")},
            "methods": methods, "setup": {"runs": [r for r in runs if r["methods"]]}}


def average_results(parts: list[dict]) -> dict:
    """The mean of several runs of one comparison: the same N facts in other orders, on other thread
    counts, or with editors trained from other seeds. One sequential run is one sample (near-tied
    router choices flip with the summation order, and each training seed learns another router), so a
    comparison between methods is read on the mean of several.

    Every number of a method's row is averaged over the runs (curves point by point); ``spread``
    gives the [min, max] over the runs of each table metric. Only methods present in every run are
    kept. Runs must agree on N, the scoring and the baseline, and on the set of facts where every
    run records its stream (``setup.stream``).
    """
    if len(parts) < 2:
        raise MergeError("averaging needs at least two runs")
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        _check_comparable(first, part, i, ("n", "scoring"))
    streams = [p.get("setup", {}).get("stream") for p in parts]
    if all(streams) and any(sorted(s) != sorted(streams[0]) for s in streams):
        raise MergeError("the runs edited different facts (setup.stream): averaging needs the same facts")
    names = [n for n in first["methods"] if all(n in p["methods"] for p in parts)]
    if not names:
        raise MergeError("no method is in every run")
    methods = {}
    for name in names:
        rows = [p["methods"][name] for p in parts]
        methods[name] = {**_mean_of(rows),
                         "spread": {k: [min(r[k] for r in rows), max(r[k] for r in rows)] for k in (*METRICS, "mean")}}
    return {**{k: v for k, v in first.items() if k not in ("methods", "setup", "order_seed")},
            "methods": methods, "replicates": len(parts), "setup": {"runs": [p.get("setup", {}) for p in parts]}}


def _check_comparable(first: dict, part: dict, i: int, keys: tuple[str, ...]) -> None:
    for key in keys:
        if part.get(key) != first.get(key):
            raise MergeError(f"run {i} has another {key} than run 0: {part.get(key)!r} vs {first.get(key)!r}")
    if not _same_baseline(part.get("baseline", {}), first.get("baseline", {})):
        raise MergeError(f"run {i} has another before-editing baseline than run 0 (another model, stream "
                         f"or probe set?): {part.get('baseline')!r} vs {first.get('baseline')!r}")


def _mean_of(values: list):
    """Element-wise mean of equally shaped JSON values; equal non-numbers are kept, unequal ones dropped."""
    v0 = values[0]
    if isinstance(v0, dict):
        return {k: _mean_of([v[k] for v in values]) for k in v0 if all(isinstance(v, dict) and k in v for v in values)}
    if isinstance(v0, list):
        if all(isinstance(v, list) and len(v) == len(v0) for v in values):
            return [_mean_of(list(items)) for items in zip(*values)]
        return []
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return v0 if all(v == v0 for v in values) else sum(values) / len(values)
    return v0 if all(v == v0 for v in values) else None


def _same_baseline(a: dict, b: dict, rtol: float = 1e-5) -> bool:
    """Equal keys and counts; floats (perplexity sums in another order on another run) within rtol."""
    if a.keys() != b.keys():
        return False
    return all(math.isclose(a[k], b[k], rel_tol=rtol) if isinstance(a[k], float) or isinstance(b[k], float)
               else a[k] == b[k] for k in a)


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
    """Each metric against the number of edits, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(12, 6.5))
    axes = grid.ravel()
    for name, m in results["methods"].items():
        xs = [p["edits"] for p in m["curve"]]
        for ax, metric in zip(axes, METRICS):
            ax.plot(xs, [p[metric] for p in m["curve"]], marker="o", ms=3, label=name)
    for ax, metric in zip(axes, METRICS):
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("edits")
        ax.set_ylabel("%")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].axis("off")  # the sixth panel holds the legend
    axes[-1].legend(handles, labels, loc="center", fontsize=9)
    fig.suptitle(f"Sequential editing, N = {results['n']}")
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
