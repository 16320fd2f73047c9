"""MEMIT's keys and target values (Meng et al., ICLR 2023; reference rlsedit.md §3), for the down_proj
editors built on them: RLSEdit (rlsedit.py) and AlphaEdit (alphaedit.py).

Keys, the target value z and the residual spread over the edited layers follow MEMIT: keys are
down_proj inputs at the fact token, averaged over context prefixes (k = ½ k_plain + ½ mean k_ctx);
z = h + δ is optimised once at the last edited layer (the z layer); layer i of L_e then takes the
residual R = (z − h) / (L_e − i), with h recomputed on the partly edited model.

The fact token is the subject's last token (MEMIT, the paper) on deep models and the prompt's last
token on shallow ones (rlsedit.default_fact_token: the 6-layer demo model looks facts up there,
measured by causal tracing). The value optimisation is scale-aware (lr relative to ‖h‖/√d, decay
relative to ‖h‖) and stops on the target NLL; docs/rlsedit.md has the measurements.

Nothing here changes the model: the partly edited model that the spreading needs is emulated with
thread-local forward hooks (``_override_hooks``), so concurrent generation never sees it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .capture import target_text, thread_hooks
from .model import decoder_layers, module_refs, resolve_modules
from .subject import Subject
from .tensors import logits_at, right_pad

if TYPE_CHECKING:
    from .rlsedit import RLSEditConfig

log = logging.getLogger(__name__)


CONTEXT_POOL = (
    "The following is a short note.", "Here is what we know.", "This was reported yesterday.",
    "I read about it in the paper.", "You may find this interesting.", "Therefore, it is worth noting.",
    "Because of this, many people agree.", "The story begins here.", "According to the records.",
    "In the end, it was clear.", "She wrote about it later.", "They said the same thing again.",
    "It is a well known fact.", "We talked about it for hours.", "Some of this is surprising.",
)


def _token_index(tokenizer, text: str, char_end: int) -> tuple[list[int], int]:
    """(input_ids of ``text`` with special tokens, index of the token holding character char_end − 1)."""
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < char_end]
        if hits:
            return list(enc["input_ids"]), hits[-1]
    except (NotImplementedError, ValueError, KeyError):
        pass
    # Slow tokenizers: MEMIT's rule, last token of the text up to the subject's end.
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return list(ids), len(tokenizer(text[:char_end], add_special_tokens=True)["input_ids"]) - 1


class _Stop(Exception):
    """Ends a forward pass once the deepest needed layer has run."""


def _block_output(out):
    return out[0] if isinstance(out, tuple) else out


def _with_block_output(out, new):
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new


VALUES_FORMAT = "hiedit-memit-values-v1"


class ValueLog:
    """The target values z of a stream's edits, by record index, in a JSON-lines file: written as a
    benchmark run edits, read back to replay those edits without the value search.

    Why: MEMIT's value search (``_compute_z``, up to ``v_steps`` forward and backward passes) is about 90%
    of an edit's time on SmolLM2 (py-spy, docs/results.md), and everything else an edit does (keys on the
    partly edited model, the per-layer solve, the editor's state) is cheap and is recomputed. A run's
    progress thus travels as ~3 KB an edit, where its weights' checkpoint and AlphaEdit's state are tens of
    MB: a run stopped on a machine that does not keep its disk starts again from W^0 with this file and
    redoes only the cheap part of the edits it holds. A replayed z is the one the run computed for the
    same fact on the same partly edited model (the edits before it are replayed the same way), so the
    replayed run is the run itself, up to float rounding where the replaying machine's kernels differ.

    Line 1: {"format", "key"} (a log made under another key is discarded); then one line per value
    search: {"i": record index, "fact": digest of (prompt, target, subject), "z": base64 float32 [d_v],
    "info": the search's info}. A torn last line is dropped.
    """

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key
        self.entries: dict[int, dict] = {}
        self.index: int | None = None   # the stream record being edited (the harness sets it)
        self.replayed = 0
        head, entries = self.read(self.path)
        if head == {"format": VALUES_FORMAT, "key": key}:
            self.entries = {int(e["i"]): e for e in entries}
        elif head is not None:
            log.warning("value log %s made under other settings: not used", self.path)
        self._rewrite()

    @staticmethod
    def read(path: str | Path) -> tuple[dict | None, list[dict]]:
        """(header, entries) of a value log as written, changing nothing: (None, []) for no file, header
        None for a file whose first line is not JSON; entries stop before a torn line (a stop while writing)."""
        path = Path(path)
        lines = path.read_text().splitlines() if path.is_file() else []
        if not lines:
            return None, []
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            return None, []
        entries = []
        for line in lines[1:]:
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                break  # the torn line and nothing after it
            if not isinstance(e, dict) or "i" not in e or "info" not in e:
                break
            entries.append(e)
        return head, entries

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(x) + "\n" for x in
                               [{"format": VALUES_FORMAT, "key": self.key}, *self.entries.values()]))
        tmp.replace(self.path)

    @staticmethod
    def fact_digest(subject: Subject, prompt: str, target: str) -> str:
        return hashlib.sha256(json.dumps([prompt, target, subject.text]).encode()).hexdigest()[:16]

    def get(self, fact: str) -> tuple[torch.Tensor, dict] | None:
        """(z [d_v] float32, info) logged for the current record, or None. A record logged for another
        fact ends the log there: it, and everything after it, was made on another stream."""
        e = self.entries.get(self.index) if self.index is not None else None
        if e is None:
            return None
        if e["fact"] != fact:
            log.warning("value log %s: record %d is another fact; its values from there on are dropped",
                        self.path, self.index)
            self.entries = {i: x for i, x in self.entries.items() if i < self.index}
            self._rewrite()
            return None
        self.replayed += 1
        z = torch.frombuffer(bytearray(base64.b64decode(e["z"])), dtype=torch.float32).clone()
        return z, {**e["info"], "z_replayed": True}

    def put(self, fact: str, z: torch.Tensor, info: dict) -> None:
        if self.index is None:
            return
        e = {"i": self.index, "fact": fact,
             "z": base64.b64encode(z.detach().float().cpu().contiguous().numpy().tobytes()).decode(),
             "info": info}
        self.entries[self.index] = e
        with self.path.open("a") as f:
            f.write(json.dumps(e) + "\n")


class MemitEditor:
    """The key/value half of a MEMIT-style editor bound to a model's down_proj layers.

    ``cfg`` is an RLSEditConfig (fact_token resolved, not "auto"): its layer spec, fact token, context and
    z settings are read here. Subclasses add the per-layer solve and the state (RLSEditor, AlphaEditor).

    Attributes:
        modules:    down_proj names of the layer spec, ascending layer order (MEMIT's)
        module_map: {module: nn.Linear}
        layer_of:   {module: its decoder layer}
        z_layer:    the decoder layer whose output z is optimised at (the last edited one)
        contexts:   the prefixes keys and z are averaged over: "" and cfg.n_contexts others
    """

    def __init__(self, model: nn.Module, tokenizer, cfg: RLSEditConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        refs = module_refs(model, cfg.layers)
        if any(r.kind != "down" for r in refs):
            raise ValueError(f"layers {cfg.layers!r}: RLSEdit edits down_proj modules only (use down[a-b])")
        refs = sorted(refs, key=lambda r: r.layer)  # MEMIT order: ascending layers
        self.module_map = resolve_modules(model, ",".join(f"down[{r.layer}]" for r in refs))
        self.modules = list(self.module_map)
        self.layer_of = {r.name: r.layer for r in refs}
        self.z_layer = refs[-1].layer
        self.device = next(model.parameters()).device
        self.contexts = self._make_contexts()
        self.value_log: ValueLog | None = None  # set by the benchmark harness (evaluate.run_method) only

    # ---- context prefixes ------------------------------------------------------------------------------

    def _make_contexts(self) -> list[str]:
        """Prefixes "" + n_contexts others (each "<sentence> "), deterministic given cfg.seed."""
        n = self.cfg.n_contexts
        if n == 0:
            return [""]
        if self.cfg.context_mode == "fixed":
            rng = random.Random(self.cfg.seed)
            return [""] + [s + " " for s in rng.sample(CONTEXT_POOL, min(n, len(CONTEXT_POOL)))]
        return [""] + [t + ". " for t in self._generate_prefixes(n)]

    @torch.no_grad()
    def _generate_prefixes(self, n: int) -> list[str]:
        """MEMIT's context templates: short top-5 samples from generic starts, seeded (torch.Generator)."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        starts = ["The", "Therefore", "Because", "I", "You"]
        out = []
        for i in range(n):
            ids = self.tokenizer(starts[i % len(starts)], add_special_tokens=True)["input_ids"]
            for _ in range(self.cfg.context_tokens):
                logits = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False).logits[0, -1]
                top = logits.float().cpu().topk(5)
                pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
                ids.append(int(top.indices[pick]))
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            out.append(text.replace("{", " ").replace("}", " ").strip())
        return out

    # ---- forward passes ---------------------------------------------------------------------------------

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def _override_hooks(self, overrides: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        """Hooks adding ΔW x = left (right x) to down_proj outputs: the model as if the deltas were applied."""
        def hook(left, right):
            def fn(_m, args, out):
                x = args[0]
                return out + ((x.float() @ right.T) @ left.T).to(out.dtype)
            return fn
        return [(self.module_map[n], hook(l.to(self.device), r.to(self.device))) for n, (l, r) in overrides.items()]

    @torch.no_grad()
    def _keys_and_state(self, name: str, rows: list[list[int]], idx: list[int],
                        overrides: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        """One forward (to the z layer) of the context rows on the model with ``overrides`` applied.

        Returns (K [1, d_k] float32: ½ k_plain + ½ mean k_ctx, h [d_v]: z-layer block output of the
        plain prompt at the subject's last token, y [d_v]: down_proj output there; both float32).
        """
        ids, mask = (t.to(self.device) for t in right_pad(rows, self._pad_id))
        pos = torch.tensor(idx, device=self.device)
        box: dict[str, torch.Tensor] = {}
        b = torch.arange(len(rows), device=self.device)

        def cap_down(_m, args, out):
            box["k"] = args[0][b, pos].float()
            box["y"] = out[0, idx[0]].float()

        def cap_block(_m, _args, out):
            box["h"] = _block_output(out)[0, idx[0]].float()
            raise _Stop

        pairs = self._override_hooks(overrides) + [(self.module_map[name], cap_down),
                                                   (decoder_layers(self.model)[self.z_layer], cap_block)]
        with thread_hooks(pairs):
            try:
                self.model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
        k = box["k"]
        key = k[0] if len(rows) == 1 else 0.5 * k[0] + 0.5 * k[1:].mean(0)
        return key[None].contiguous().cpu(), box["h"], box["y"]

    def _fact_index(self, text: str, subject_end: int) -> tuple[list[int], int]:
        """(input_ids of ``text``, the fact token: the subject's last token or the text's last token)."""
        ids, i = _token_index(self.tokenizer, text, subject_end)
        return (ids, len(ids) - 1) if self.cfg.fact_token == "last" else (ids, i)

    def _value(self, subject: Subject, prompt: str, target: str) -> tuple[torch.Tensor, dict]:
        """z and the search's info: from ``value_log`` when it holds this edit, else searched (and logged)."""
        fact = ValueLog.fact_digest(subject, prompt, target) if self.value_log is not None else ""
        if self.value_log is not None and (hit := self.value_log.get(fact)) is not None:
            return hit
        t0 = time.perf_counter()
        z, info = self._compute_z(subject, prompt, target)
        info["z_ms"] = 1000.0 * (time.perf_counter() - t0)
        if self.value_log is not None:
            self.value_log.put(fact, z, info)
        return z, info

    def _compute_z(self, subject: Subject, prompt: str, target: str):
        """Target hidden state z = h_init + δ at the z layer (reference §3.2). Returns (z [d_v], info)."""
        cfg = self.cfg
        tgt = self.tokenizer(target_text(prompt, target), add_special_tokens=False)["input_ids"]
        rows, idx, spans = [], [], []
        for ctx in self.contexts:
            ids, i = self._fact_index(ctx + prompt, len(ctx) + subject.end)
            spans.append((len(ids) - 1, len(tgt)))
            rows.append(ids + tgt[:-1])
            idx.append(i)
        kl_text = cfg.kl_prompt.format(subject.text)
        kl_ids, kl_i = self._fact_index(kl_text, kl_text.find(subject.text) + len(subject.text))
        rows.append(kl_ids)
        idx.append(kl_i)
        ids, mask = (t.to(self.device) for t in right_pad(rows, self._pad_id))
        n_rw = len(self.contexts)
        # Only the target positions and the KL prompt's fact token are read: the vocabulary is projected
        # there alone (logits_at), in row-major order, so row r's targets are logp[starts[r] : starts[r] + n_r]
        # and the KL position, in the last row, is logp[-1].
        keep = torch.zeros(ids.shape, dtype=torch.bool)
        for r, (s, n) in enumerate(spans):
            keep[r, s:s + n] = True
        keep[n_rw, idx[n_rw]] = True
        starts = [sum(n for _, n in spans[:r]) for r in range(n_rw)]
        b = torch.arange(len(rows), device=self.device)
        pos = torch.tensor(idx, device=self.device)
        labels = torch.tensor(tgt, device=self.device)
        block = decoder_layers(self.model)[self.z_layer]
        d_v = self.module_map[self.modules[-1]].out_features
        delta = torch.zeros(d_v, dtype=torch.float32, device=self.device, requires_grad=True)
        box: dict[str, torch.Tensor] = {}

        def add_delta(_m, _args, out):
            hs = _block_output(out)
            if "h_init" not in box:
                box["h_init"] = hs[0, idx[0]].detach().float()
            hs = hs.clone()
            hs[b, pos] = hs[b, pos] + delta.to(hs.dtype)
            return _with_block_output(out, hs)

        opt = torch.optim.Adam([delta], lr=cfg.v_lr if cfg.v_lr is not None else 0.0)  # None: set at step 0
        kl_init, nll, steps = None, float("nan"), 0
        with thread_hooks([(block, add_delta)]), torch.enable_grad():
            for it in range(cfg.v_steps):
                opt.zero_grad()
                logp = logits_at(self.model, ids, mask, keep).log_softmax(-1)  # [P, V]
                # −mean log p(target) per rewriting prompt, averaged over prompts
                nll_rows = [-logp[a:a + n].gather(-1, labels[:, None]).mean() for a, (_, n) in zip(starts, spans)]
                nll_t = torch.stack(nll_rows).mean()
                kl_lp = logp[-1]
                if kl_init is None:
                    kl_init = kl_lp.detach()
                kl = cfg.kl_factor * F.kl_div(kl_init[None], kl_lp[None], log_target=True, reduction="batchmean")
                h_norm = box["h_init"].norm().clamp_min(1e-12)
                decay = cfg.v_weight_decay * delta.norm() / h_norm
                loss = nll_t + kl + decay
                if it == 0 and cfg.v_lr is None:  # lr = v_lr_scale · ‖h_init‖ / √d_v (see RLSEditConfig)
                    opt.param_groups[0]["lr"] = cfg.v_lr_scale * float(h_norm) / math.sqrt(d_v)
                nll, steps = float(nll_t.detach()), it + 1
                # Stop on the fit alone. KL and decay do not vanish once δ ≠ 0, so MEMIT's test on the
                # total loss rarely fires: on the demo the NLL fell below 0.05 after ~6 steps while all 25
                # ran and δ grew to the clamp, 3x the time and a larger, less local edit for nothing.
                if nll < cfg.early_stop_loss or it == cfg.v_steps - 1:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():  # project δ into the ball ‖δ‖ ≤ clamp · ‖h_init‖
                    max_norm = cfg.clamp_norm_factor * box["h_init"].norm()
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
        z = box["h_init"] + delta.detach()
        return z, {"z_steps": steps, "z_nll": nll, "z_delta_norm": float(delta.detach().norm()),
                   "h_norm": float(box["h_init"].norm()), "v_lr": opt.param_groups[0]["lr"]}

    def _to_down_space(self, name: str, r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A residual-stream change r [d_v] as a change of the down_proj output y [d_v].

        Llama adds down_proj's output to the residual directly (identity). Gemma-2/3 normalise it
        first (post_feedforward_layernorm, o = g ⊙ y / rms(y), g = 1 + weight), so to first order at
        y's scale r needs Δy = rms(y) · r / g. Gemma-3-270M has gains near zero (18 of layer 4's 640
        within 0.05 of it): the plain division multiplied r by up to 10³ there, gave ‖ΔW‖ in the
        thousands and raised the target's loss (2.94 → 9.22 on the one fact of
        tests/test_real_models.py). A coordinate the norm nearly blocks cannot carry a change, so the
        preimage is damped (Tikhonov, the least-squares Δy of ‖g ⊙ Δy / rms − r‖² + ε ‖Δy / rms‖²):

            Δy = rms(y) · r ⊙ g / (g² + ε),    ε = (median |g|)²

        i.e. the exact preimage where |g| ≫ median |g|, and about r ⊙ g · rms / ε where the gain is small.
        ε was chosen on 8 facts of the development stream (docs/models.md, RLSEdit on Gemma-3).
        """
        norm = getattr(decoder_layers(self.model)[self.layer_of[name]], "post_feedforward_layernorm", None)
        if norm is None:
            return r
        y64, r64 = y.double(), r.double()
        gain = norm.weight.detach().double() + (1.0 if type(norm).__name__.startswith("Gemma") else 0.0)
        rms = (y64.pow(2).mean() + getattr(norm, "eps", 1e-6)).sqrt()
        eps = float(gain.abs().median()) ** 2
        return (rms * r64 * gain / (gain.pow(2) + eps)).float()


def post_norm_mlp(model: nn.Module) -> bool:
    """Whether the MLP output is normalised before it joins the residual (Gemma-2/3's post-FFN norm)."""
    return any(hasattr(layer, "post_feedforward_layernorm") for layer in decoder_layers(model))
