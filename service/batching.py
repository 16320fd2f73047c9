"""Continuous batching: every concurrent generation request decoded together, one token per step.

One thread owns the decode loop. A request is *admitted* at a step boundary: its prompt is run through
the model (prefill) and its key/value cache joined to the running batch's, left-padded to a common
length (masked positions, so they contribute nothing); from then on each step runs ONE forward pass
for every active row: [B, 1] new tokens against the joined cache. A row leaves the batch when it ends
(end of text, its own max_new_tokens, a client that went away) and its answer is returned at once,
while the others go on. On a memory-bound CPU decode a step of 16 rows costs little more than a step
of one, which is where the throughput comes from (bench/batching.py).

Weights: the loop holds the read side of the engine's RWLock while any row is active, so a request
sees one set of weights from its first token to its last. When an edit is waiting to swap weights,
no new row is admitted; the batch drains, the lock is released, the edit swaps, and the waiting
requests are admitted on the new weights. (An edit therefore waits for the longest active request,
as it did when each request ran its own ``model.generate``.)

Models whose cache is not one plain key/value tensor per layer (Gemma-3's sliding-window layers) are
batched *statically*: requests that arrive while a batch runs are admitted once it has drained,
because joining a sliding-window cache would need its own padding rules. Said in docs/api.md.

Greedy rows pick the argmax of each step's logits; sampled rows draw from softmax(logits / T) with
their own ``torch.Generator`` (seeded when the request has a seed). Batching changes the shapes of the
matrix products, so logits can differ from a lone request's in the last float bits; a greedy answer
changes only where two tokens tie to that precision (``tests/test_batching.py`` compares 16
concurrent answers with the same prompts decoded alone).
"""
from __future__ import annotations

import concurrent.futures
import inspect
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("hiedit.batching")


@dataclass
class GenerationRequest:
    """One request: token ids in, (text, number of new tokens) out through ``future``."""

    ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    seed: int | None = None
    ignore_eos: bool = False  # exactly max_new_tokens tokens (benchmarks)
    on_token: Callable[[int], None] | None = None  # each new token id, from the decode thread
    cancel: threading.Event | None = None  # set: the row leaves the batch at the next step
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.temperature > 0:
            self.generator = torch.Generator()
            if self.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.seed)


class _Batch:
    """The running rows and their joined state: cache [B, heads, T, d] per layer, mask [B, T], last position [B]."""

    def __init__(self, rows: list[GenerationRequest], cache, mask: torch.Tensor, pos: torch.Tensor,
                 logits: torch.Tensor):
        self.rows, self.cache, self.mask, self.pos, self.logits = rows, cache, mask, pos, logits

    def keep(self, idx: list[int]) -> None:
        if len(idx) == len(self.rows):
            return
        index = torch.tensor(idx, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in idx]
        self.mask, self.pos, self.logits = self.mask[index], self.pos[index], self.logits[index]

    def join(self, other: "_Batch") -> None:
        """Append ``other``'s rows: the shorter cache and mask are left-padded to the longer one's length."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, length, 2), _left_pad(theirs.keys, length, 2)])
            mine.values = torch.cat([_left_pad(mine.values, length, 2), _left_pad(theirs.values, length, 2)])
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(other.mask, length, 1)])
        self.pos = torch.cat([self.pos, other.pos])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows += other.rows


def _cache_of(out):
    """The model output's key/value cache (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``t`` with zeros prepended along ``dim`` up to ``length``."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


class Batcher:
    """The decode loop of a served model. ``submit`` from any thread; ``start``/``stop`` with the engine.

    Args:
        model, tokenizer: the served model (its weights change only under ``lock``'s write side).
        lock: the engine's RWLock (``read()``, ``write()``, ``writer_waiting``).
        max_batch: rows decoded together; more requests wait for a place.
    """

    def __init__(self, model: nn.Module, tokenizer, lock, max_batch: int):
        self.model = model
        self.lock = lock
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.tokenizer = tokenizer
        # transformers 5 renamed forward's ``past_key_values`` to ``cache`` (the old name warns, then goes)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._pending: queue.Queue[GenerationRequest] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hiedit-decode", daemon=True)
        self.joinable: bool | None = None  # known after the first prefill: can a cache be joined mid-batch?
        self.steps = 0  # decode steps run (a step = one forward pass for every active row)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        while not self._pending.empty():  # nobody will decode these any more
            self._pending.get_nowait().future.set_exception(RuntimeError("the server is shutting down"))

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future:
        if self._stop.is_set():
            raise RuntimeError("the server is shutting down")
        self._pending.put(request)
        self._wake.set()
        return request.future

    # ---- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._pending.empty():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            with self.lock.read(), torch.no_grad():  # waits while an edit swaps weights
                batch: _Batch | None = None
                while not self._stop.is_set():
                    if not self.lock.writer_waiting and (batch is None or self.joinable):
                        batch = self._admit(batch)
                    if batch is None:
                        break  # nothing active: release the read lock (an edit may be waiting)
                    batch = self._step(batch)
                if batch is not None:  # stopping
                    for row in batch.rows:
                        row.future.set_exception(RuntimeError("the server is shutting down"))

    def _admit(self, batch: _Batch | None) -> _Batch | None:
        room = self.max_batch - (len(batch.rows) if batch else 0)
        new: list[GenerationRequest] = []
        while len(new) < room:
            try:
                row = self._pending.get_nowait()
            except queue.Empty:
                break
            if row.cancel is not None and row.cancel.is_set():
                row.future.set_result(("", 0))
                continue
            new.append(row)
        if not new:
            return batch
        try:
            prefilled = self._prefill(new)
        except Exception as e:  # noqa: BLE001 - these requests fail; the running batch goes on
            log.exception("prefill failed")
            for row in new:
                row.future.set_exception(e)
            return batch
        if batch is None:
            return prefilled
        batch.join(prefilled)
        return batch

    def _prefill(self, rows: list[GenerationRequest]) -> _Batch:
        """Prompts left-padded into one forward pass: the batch's cache and each row's next-token logits."""
        length = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(rows), length), dtype=torch.long, device=self.device)
        for i, row in enumerate(rows):
            ids[i, length - len(row.ids):] = torch.tensor(row.ids, device=self.device)
            mask[i, length - len(row.ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = _cache_of(out)
        if self.joinable is None:
            self.joinable = all(hasattr(layer, "keys") and not getattr(layer, "is_sliding", False)
                                for layer in getattr(cache, "layers", [None]))
        return _Batch(list(rows), cache, mask, pos[:, -1], out.logits[:, -1].float())

    def _step(self, batch: _Batch) -> _Batch | None:
        """Choose each row's next token, retire the rows that ended, run one forward pass for the rest."""
        tokens = self._choose(batch)
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(batch.rows, tokens)):
            if row.cancel is not None and row.cancel.is_set():
                self._finish(row)
                continue
            row.tokens.append(token)
            if row.on_token is not None:
                row.on_token(token)
            ended = (token in self.eos and not row.ignore_eos) or len(row.tokens) >= row.max_new_tokens
            if ended:
                self._finish(row)
            else:
                keep.append(i)
        if not keep:
            return None
        batch.keep(keep)
        last = torch.tensor([batch.rows[j].tokens[-1] for j in range(len(keep))], device=self.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(keep), 1)], 1)
        batch.pos = batch.pos + 1
        out = self.model(input_ids=last[:, None], attention_mask=batch.mask, position_ids=batch.pos[:, None],
                         use_cache=True, **{self._cache_arg: batch.cache})
        batch.cache = _cache_of(out)
        batch.logits = out.logits[:, -1].float()
        self.steps += 1
        return batch

    def _choose(self, batch: _Batch) -> list[int]:
        logits = batch.logits
        out: list[int] = []
        for i, row in enumerate(batch.rows):
            row_logits = logits[i]
            if row.ignore_eos and self.eos:
                row_logits = row_logits.clone()
                row_logits[list(self.eos)] = float("-inf")
            if row.generator is None:
                out.append(int(row_logits.argmax()))
            else:
                probs = torch.softmax(row_logits / row.temperature, -1).cpu()
                out.append(int(torch.multinomial(probs, 1, generator=row.generator)))
        return out

    def _finish(self, row: GenerationRequest) -> None:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        row.future.set_result((text, len(row.tokens)))

