"""Pretrain a small Llama / Gemma-2 model until it *knows* a set of real CounterFact facts.

A knowledge editor can only be judged on a model that knows the facts it edits: Efficacy
compares P(new) with P(true), Specificity checks that neighbouring facts survive. The demo
base model is therefore trained from scratch, with a tokenizer trained locally, on

* the TRUE statements of CounterFact records: ``prompt + target_true``,
  ``rephrase + target_true`` and ``locality_prompt + locality_target``, and
* general English sentences from GLUE (so that it is a language model, not a lookup table,
  and so that perplexity on held-out GLUE text means something).

What makes memorisation fast enough for a 2-core CPU (see ../shared/notes/cpu-feasibility.md:
plain LM loss reached 57% after 3,000 steps on 1,000 facts):

* the loss is weighted towards answer tokens: w_ans on tokens of the object, w_ctx on the
  prompt tokens (they carry no fact, only grammar), L = Σ_t w_t CE_t / Σ_t w_t;
* fact sentences are short and repeated many times (epochs over the facts), GLUE sentences
  fill only a fixed fraction of every batch;
* a one-cycle learning-rate schedule (warm-up, then cosine decay to ~0) with AdamW.

Accuracy is the teacher-forced top-1 criterion of the benchmark: a fact counts as known when
the argmax at every answer position is the answer token (tokenised exactly as
``editor_core.capture.teacher_forced`` does: prompt with BOS, then " " + target).
"""
from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from editor_core.capture import target_text
from editor_core.data import EditRecord
from editor_core.evaluate import all_top1
from editor_core.tensors import right_pad
from editor_core.tiny import tiny_config, train_tokenizer


@dataclass
class PretrainConfig:
    """Model shape and optimisation of one pretraining run (all seeded by ``seed``)."""

    arch: str = "llama"             # "llama" or "gemma2"
    hidden: int = 256
    layers: int = 6
    intermediate: int = 768
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 4096          # tokenizer vocabulary (answers mostly become single tokens)
    steps: int = 3000
    batch_size: int = 64            # sequences per step
    glue_fraction: float = 0.0625   # share of each batch filled with GLUE sentences
    max_glue_tokens: int = 24       # GLUE sentences are cut to this many tokens
    lr: float = 3e-3                # peak of the one-cycle schedule
    pct_start: float = 0.06         # warm-up share of the steps
    weight_decay: float = 0.0       # memorisation is the goal: no decay
    answer_weight: float = 1.0      # w_ans: loss weight of answer (object) tokens
    context_weight: float = 0.1     # w_ctx: loss weight of prompt tokens and EOS
    glue_weight: float = 0.3        # weight of GLUE tokens
    grad_clip: float = 1.0
    sparse_logits: bool = False     # project to the vocabulary only where the loss weight is > 0
                                    # (with context_weight 0 that is the answer tokens, EOS and GLUE:
                                    # ~4x less work in the output layer, which dominates small models)
    seed: int = 0
    threads: int = 1               # 1: with other jobs on a 2-core machine, 2 OpenMP threads spin and run ~8x slower
    device: str = "cpu"
    eval_every: int = 500           # measure fact accuracy every this many steps (0: only at the end)
    eval_sample: int = 600          # how many fact sentences the periodic measurement uses


@dataclass(frozen=True)
class Fact:
    """One true statement to memorise: ``prompt`` followed by `` target``."""

    prompt: str
    target: str
    kind: str      # "prompt" | "rephrase" | "locality"
    case_id: str


def fact_sentences(records: Iterable[EditRecord]) -> tuple[list[Fact], int]:
    """The true statements of ``records`` (prompt, rephrase, locality), one per distinct prompt.

    Two records can put the same prompt to different answers (a neighbourhood prompt of one
    case is another case's prompt with a different object). A model cannot know both, so the
    first one seen wins; returns (facts, number of conflicting duplicates dropped).
    """
    facts: list[Fact] = []
    seen: dict[str, str] = {}
    conflicts = 0
    for rec in records:
        for kind, prompt, target in (("prompt", rec.prompt, rec.target_true),
                                     ("rephrase", rec.rephrase, rec.target_true),
                                     ("locality", rec.locality_prompt, rec.locality_target)):
            if not target.strip():
                continue
            key = prompt.strip()
            if key in seen:
                conflicts += seen[key] != target.strip()
                continue
            seen[key] = target.strip()
            facts.append(Fact(prompt, target.strip(), kind, rec.case_id))
    return facts, conflicts


# --------------------------------------------------------------------------------------------
# Tokenisation into weighted training sequences
# --------------------------------------------------------------------------------------------

@dataclass
class Sequence_:
    """One training sequence: ids [T] and per-position loss weights [T-1] for predicting ids[1:]."""

    ids: list[int]
    weights: list[float]


def encode_fact(tokenizer, fact: Fact, cfg: PretrainConfig) -> Sequence_:
    """BOS prompt ⊕ " target" ⊕ EOS, tokenised exactly like ``capture.teacher_forced``."""
    prompt_ids = tokenizer(fact.prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(target_text(fact.prompt, fact.target), add_special_tokens=False)["input_ids"]
    ids = prompt_ids + target_ids + [tokenizer.eos_token_id]
    # weights[i] scores the prediction of ids[i + 1]
    weights = ([cfg.context_weight] * (len(prompt_ids) - 1) + [cfg.answer_weight] * len(target_ids)
               + [cfg.context_weight])
    return Sequence_(ids, weights)


def encode_text(tokenizer, text: str, cfg: PretrainConfig) -> Sequence_:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][: cfg.max_glue_tokens]
    return Sequence_(ids, [cfg.glue_weight] * (len(ids) - 1))


def collate(seqs: Sequence[Sequence_], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch. Returns input_ids [B, T], attention_mask [B, T], weights [B, T-1]."""
    ids, mask = right_pad([s.ids for s in seqs], pad_id)
    weights, _ = right_pad([s.weights for s in seqs], 0.0, torch.float32)
    return ids, mask, weights


def sparse_weighted_lm_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                            weights: torch.Tensor) -> torch.Tensor:
    """The same loss as ``weighted_lm_loss`` with the output layer applied only at positions of weight > 0.

    h = decoder(ids) [B, T, d];  logits = lm_head(h_t) for t with w_t > 0, soft-capped like the
    model does itself (Gemma-2: cap · tanh(logits / cap)).
    """
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    keep = weights > 0
    logits = model.lm_head(hidden[keep])
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    ce = F.cross_entropy(logits.float(), ids[:, 1:][keep], reduction="none")
    w = weights[keep]
    return (ce * w).sum() / w.sum().clamp_min(1e-8)


def weighted_lm_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L = Σ_t w_t CE(logits_t, ids_{t+1}) / Σ_t w_t.  logits [B, T, V], ids [B, T], weights [B, T-1]."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    w = weights.flatten()
    return (ce * w).sum() / w.sum().clamp_min(1e-8)


# --------------------------------------------------------------------------------------------
# Measuring what the model knows
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def fact_correct(model: nn.Module, tokenizer, facts: Sequence[Fact], batch_size: int = 256) -> list[bool]:
    """Teacher-forced top-1 per fact: True when every answer token is the argmax at its position."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[bool] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(facts), batch_size):
        chunk = facts[start: start + batch_size]
        rows, labels = [], []
        for f in chunk:
            p = tokenizer(f.prompt, add_special_tokens=True)["input_ids"]
            t = tokenizer(target_text(f.prompt, f.target), add_special_tokens=False)["input_ids"]
            rows.append(p + t[:-1])
            labels.append([-100] * (len(p) - 1) + t)      # the answer tokens, at the positions predicting them
        ids, mask = right_pad(rows, pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.cpu()
        out.extend(bool(x) for x in all_top1(logits, right_pad(labels, -100)[0]))
    model.train(was_training)
    return out


def accuracy_report(model: nn.Module, tokenizer, facts: Sequence[Fact],
                    groups: dict[str, set[str]] | None = None) -> dict[str, float]:
    """Top-1 accuracy (percent) overall, per kind (prompt/rephrase/locality) and per case-id group."""
    correct = fact_correct(model, tokenizer, facts)

    def pct(sel: list[bool]) -> float:
        return round(100.0 * sum(sel) / max(len(sel), 1), 2)

    report = {"all": pct(correct), "n": len(facts)}
    for kind in ("prompt", "rephrase", "locality"):
        report[kind] = pct([c for c, f in zip(correct, facts) if f.kind == kind])
    for name, ids in (groups or {}).items():
        report[f"{name}/all"] = pct([c for c, f in zip(correct, facts) if f.case_id in ids])
        report[f"{name}/prompt"] = pct([c for c, f in zip(correct, facts) if f.case_id in ids and f.kind == "prompt"])
    return report


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class PretrainResult:
    out_dir: Path | None
    n_params: int
    seconds: float
    accuracy: dict[str, float]
    losses: list[float] = field(default_factory=list)   # running loss every 50 steps
    history: list[dict] = field(default_factory=list)   # periodic accuracy measurements
    conflicts: int = 0


def build_tokenizer(facts: Sequence[Fact], glue_texts: Sequence[str], vocab_size: int):
    """Byte-level BPE trained on the fact sentences (twice, so that subjects and objects get whole
    tokens) plus the GLUE text."""
    texts = [f"{f.prompt}{target_text(f.prompt, f.target)}" for f in facts]
    return train_tokenizer(texts + texts + list(glue_texts), vocab_size=vocab_size)


def make_model(cfg: PretrainConfig, vocab_size: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    mcfg = tiny_config(cfg.arch, vocab_size=vocab_size, hidden=cfg.hidden, layers=cfg.layers,
                       intermediate=cfg.intermediate, heads=cfg.heads, kv_heads=cfg.kv_heads, max_positions=256)
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(mcfg)


def pretrain(records: Sequence[EditRecord], glue_texts: Sequence[str], cfg: PretrainConfig,
             out_dir: str | Path | None = None, tokenizer=None,
             groups: dict[str, set[str]] | None = None, progress: bool = True,
             log=print) -> PretrainResult:
    """Train a model from scratch on the true statements of ``records`` plus ``glue_texts``.

    tokenizer: reuse one (the Gemma twin shares the Llama model's tokenizer), else train one.
    groups:    named sets of case_ids to report accuracy for separately (e.g. the split streams).
    Saves model + tokenizer with ``save_pretrained`` to ``out_dir`` when given.
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    facts, conflicts = fact_sentences(records)
    if not facts:
        raise ValueError("records: no true statements to train on")
    if tokenizer is None:
        tokenizer = build_tokenizer(facts, glue_texts, cfg.vocab_size)
    model = make_model(cfg, len(tokenizer)).to(cfg.device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[pretrain] {cfg.arch}: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, "
        f"{len(facts)} fact sentences ({conflicts} conflicting duplicates dropped), {len(glue_texts)} GLUE sentences")

    fact_seqs = [encode_fact(tokenizer, f, cfg) for f in facts]
    glue_seqs = [encode_text(tokenizer, t, cfg) for t in glue_texts if t.strip()]
    n_glue = round(cfg.batch_size * cfg.glue_fraction) if glue_seqs else 0
    n_fact = cfg.batch_size - n_glue

    rng = random.Random(cfg.seed)
    pending: list[list[int]] = []

    def next_facts() -> list[Sequence_]:
        # Epochs over the facts: every fact is seen once per pass, in a fresh seeded order.
        # Within a pool of 32 batches the facts are grouped by length, so that one long ROME
        # paraphrase (up to ~110 tokens) does not pad a whole batch of 14-token sentences.
        if not pending:
            perm = list(range(len(fact_seqs)))
            rng.shuffle(perm)
            pool = n_fact * 32
            for lo in range(0, len(perm), pool):
                chunk = sorted(perm[lo: lo + pool], key=lambda i: len(fact_seqs[i].ids))
                batches = [chunk[j: j + n_fact] for j in range(0, len(chunk), n_fact)]
                rng.shuffle(batches)
                pending.extend(batches)
        return [fact_seqs[i] for i in pending.pop(0)]

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=cfg.pct_start,
                                                div_factor=20.0, final_div_factor=200.0)
    eval_facts = facts if len(facts) <= cfg.eval_sample else random.Random(cfg.seed + 1).sample(facts, cfg.eval_sample)
    result = PretrainResult(out_dir=Path(out_dir) if out_dir else None, n_params=n_params, seconds=0.0,
                            accuracy={}, conflicts=conflicts)
    running = None
    bar = tqdm(range(cfg.steps), desc=f"pretrain {cfg.arch}", disable=not progress, mininterval=2.0)
    for step in bar:
        batch = next_facts() + [glue_seqs[rng.randrange(len(glue_seqs))] for _ in range(n_glue)]
        ids, mask, weights = collate(batch, tokenizer.pad_token_id)
        ids, mask, weights = ids.to(cfg.device), mask.to(cfg.device), weights.to(cfg.device)
        if cfg.sparse_logits:
            loss = sparse_weighted_lm_loss(model, ids, mask, weights)
        else:
            loss = weighted_lm_loss(model(input_ids=ids, attention_mask=mask).logits, ids, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            result.losses.append(round(running, 4))
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            acc = 100.0 * sum(fact_correct(model, tokenizer, eval_facts)) / len(eval_facts)
            result.history.append({"step": step + 1, "sample_accuracy": round(acc, 2), "loss": round(running, 4),
                                   "seconds": round(time.time() - t0, 1)})
            log(f"[pretrain] step {step + 1}: loss {running:.3f}, top-1 on {len(eval_facts)} sampled facts "
                f"{acc:.1f}%, {time.time() - t0:.0f}s")
    model.eval()
    result.accuracy = accuracy_report(model, tokenizer, facts, groups)
    result.seconds = round(time.time() - t0, 1)
    log(f"[pretrain] done in {result.seconds:.0f}s: top-1 accuracy on all {len(facts)} trained fact sentences "
        f"{result.accuracy['all']:.2f}% (prompt {result.accuracy['prompt']:.2f}%, rephrase "
        f"{result.accuracy['rephrase']:.2f}%, locality {result.accuracy['locality']:.2f}%)")
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        meta = {"config": asdict(cfg), "n_params": n_params, "seconds": result.seconds,
                "accuracy": result.accuracy, "history": result.history, "conflicts": conflicts,
                "n_fact_sentences": len(facts), "n_glue_sentences": len(glue_seqs),
                "torch": torch.__version__}
        (out / "pretrain.json").write_text(json.dumps(meta, indent=2) + "\n")
    return result
