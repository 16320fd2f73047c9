"""Second-moment statistics Σ̂ of ``down_proj`` inputs: the anchor term of MEMIT / RLSEdit.

For every edited layer l the key k ∈ R^{d_k} is the input of ``mlp.down_proj`` (the gated
activation act(gate(x)) ⊙ up(x)). Over every non-pad token of a general text corpus::

    Σ̂_l = (1/N) Σ_tokens k kᵀ            [d_k, d_k]   normalised, uncentred (MEMIT's mom2)

stands in for K_0ᵀK_0 in RLSEdit's A_0 = α I + β w Σ̂ (reference rlsedit.md §1.2, §3.4).

Σ̂ is cached on disk, one safetensors file (plus a JSON sidecar for humans) per model, layer
and corpus setting. Every file carries the *fingerprint* of the weights it was collected on
(dtype-independent: weights rounded to bf16), and ``load`` refuses a file made for another model.
Statistics belong to the unedited base model: collect them before edits are applied (RLSEditor.create
does this eagerly).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import SHARED_DATA
from .model import decoder_layers, model_id
from .state import tensor_digest
from .tensors import right_pad

STATS_FORMAT = "hiedit-mom2-v1"
DEFAULT_CORPUS = SHARED_DATA / "glue"
# String fields of the GLUE/MMLU records (and common corpus layouts) that hold running text.
TEXT_FIELDS = ("text", "sentence", "sentence1", "sentence2", "question", "prompt", "src")


class StatsError(ValueError):
    """Statistics that cannot be collected or read (empty corpus, malformed file ...)."""


class StatsMismatch(StatsError):
    """A statistics file collected on another model (or layer, or width) than the one loaded."""


# ---- corpus -------------------------------------------------------------------------------------

def _texts_from_json(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        if "texts" in obj and isinstance(obj["texts"], list):
            return _texts_from_json(obj["texts"])
        return [obj[f] for f in TEXT_FIELDS if isinstance(obj.get(f), str)]
    if isinstance(obj, list):
        return [t for item in obj for t in _texts_from_json(item)]
    return []


def corpus_files(path: str | Path | None = None) -> list[Path]:
    """The files a corpus path stands for: the file itself, or a directory's .json/.jsonl/.txt files (sorted)."""
    path = Path(path) if path is not None else DEFAULT_CORPUS
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".txt"))
    elif path.is_file():
        files = [path]
    else:
        raise StatsError(f"stats corpus {path} does not exist")
    if not files:
        raise StatsError(f"stats corpus {path} holds no .json, .jsonl or .txt files")
    return files


def read_corpus(path: str | Path | None = None) -> list[str]:
    """Texts of a corpus: one per non-empty line of a .txt, every text field of a .json/.jsonl.

    Default: the GLUE/MMLU samples in ``shared/data/glue`` (sentences, sentence pairs, questions).
    Order is deterministic (sorted files, records in file order); exact duplicates are dropped.
    """
    texts: list[str] = []
    for f in corpus_files(path):
        raw = f.read_text(encoding="utf-8")
        if f.suffix == ".txt":
            texts.extend(line.strip() for line in raw.splitlines())
        elif f.suffix == ".jsonl":
            for line in raw.splitlines():
                if line.strip():
                    texts.extend(_texts_from_json(json.loads(line)))
        else:
            try:
                texts.extend(_texts_from_json(json.loads(raw)))
            except json.JSONDecodeError as e:
                raise StatsError(f"stats corpus file {f} is not valid JSON: {e}") from None
    seen: set[str] = set()
    out = [t for t in (s.strip() for s in texts) if t and not (t in seen or seen.add(t))]
    if not out:
        raise StatsError(f"stats corpus {path or DEFAULT_CORPUS} contains no text")
    return out


def corpus_digest(path: str | Path | None = None) -> str:
    """sha256 over the corpus files' names and bytes: part of the cache key."""
    h = hashlib.sha256()
    for f in corpus_files(path):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


# ---- identity of the weights the statistics describe --------------------------------------------

def stats_fingerprint(model: nn.Module, layer: int) -> str:
    """Identity of the weights that determine layer ``layer``'s down_proj inputs, independent of dtype.

    Hashes the config widths, every 16th row of the token embedding and the attention output
    projections of layers 0..layer, all rounded to bf16. Neither HiEdit (gate/up) nor RLSEdit
    (down) edits these, so the fingerprint of a served model stays that of its base.
    """
    cfg = model.config
    h = hashlib.sha256(json.dumps([getattr(cfg, k, None) for k in
                                   ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")]).encode())
    emb = model.get_input_embeddings().weight.detach()
    h.update(tensor_digest(emb[::16].to(torch.bfloat16)).encode())
    layers = decoder_layers(model)
    for i in range(layer + 1):
        h.update(tensor_digest(layers[i].self_attn.o_proj.weight.detach().to(torch.bfloat16)).encode())
    return h.hexdigest()


# ---- the statistic ----------------------------------------------------------------------------------

@dataclass
class SecondMoment:
    """Σ̂ of one module's inputs. sigma: [d_k, d_k] float32 (CPU), symmetric PSD."""

    module: str
    sigma: torch.Tensor
    n_tokens: int
    meta: dict = field(default_factory=dict)  # model, fingerprint, corpus, limits, format

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (.safetensors, meta in its header) and ``path`` with .json (sidecar)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "module": self.module, "n_tokens": self.n_tokens, "d_in": self.sigma.shape[0],
                "format": STATS_FORMAT}
        tmp = path.with_suffix(".tmp")
        save_file({"sigma": self.sigma.detach().to("cpu", torch.float32).contiguous()}, tmp,
                  metadata={k: json.dumps(v) for k, v in meta.items()})
        os.replace(tmp, path)  # atomic: a crash never leaves half a statistics file behind
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, module: str | None = None) -> "SecondMoment":
        """Read a statistics file; with ``model``/``module`` given, refuse one made for anything else."""
        path = Path(path)
        if not path.is_file():
            raise StatsError(f"statistics file {path} does not exist")
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                raw = f.metadata() or {}
            meta = {k: json.loads(v) for k, v in raw.items()}
            sigma = load_file(path)["sigma"]
        except Exception as e:  # noqa: BLE001 - any parse failure is the same user-facing problem
            raise StatsError(f"{path} is not a readable statistics file: {e}") from e
        if meta.get("format") != STATS_FORMAT:
            raise StatsError(f"{path} is not a hiedit statistics file (format {meta.get('format')!r})")
        stat = cls(meta["module"], sigma, int(meta["n_tokens"]), meta)
        if module is not None and stat.module != module:
            raise StatsMismatch(f"statistics file {path} is for module {stat.module}, not {module}")
        if model is not None:
            layer = int(meta.get("layer", -1))
            target = model.get_submodule(stat.module) if module is None else model.get_submodule(module)
            if sigma.shape[0] != target.in_features:
                raise StatsMismatch(f"statistics file {path} has width {sigma.shape[0]}, but {stat.module} of "
                                    f"{model_id(model)!r} takes {target.in_features} inputs")
            fp = stats_fingerprint(model, layer)
            if meta.get("fingerprint") != fp:
                raise StatsMismatch(
                    f"statistics file {path} was collected on model {meta.get('model')!r} "
                    f"(fingerprint {str(meta.get('fingerprint'))[:12]}), not on the loaded model "
                    f"{model_id(model)!r} (fingerprint {fp[:12]}): delete it or collect statistics for this model")
        return stat


class _Stop(Exception):
    """Raised by a hook once the deepest needed layer has run: the rest of the forward is skipped."""


def collect_second_moments(model: nn.Module, tokenizer, modules: dict[str, nn.Linear], texts: Iterable[str],
                           max_tokens: int | None = 200_000, max_length: int = 128,
                           batch_size: int = 16) -> dict[str, SecondMoment]:
    """One pass over ``texts`` accumulating Σ k kᵀ (float64) of every module's input over non-pad tokens.

    Texts are truncated to ``max_length`` tokens; collection stops once ``max_tokens`` tokens were
    seen (None: the whole corpus). Forward passes stop after the deepest module.
    """
    device = next(model.parameters()).device
    layer_of = {n: int(n.split(".layers.")[1].split(".")[0]) for n in modules}
    deepest = max(layer_of.values())
    sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
            for n, m in modules.items()}
    mask_box: dict[str, torch.Tensor] = {}

    owner = threading.get_ident()

    def hook(name):
        def fn(_module, args, _out):
            if threading.get_ident() != owner:  # another thread (generation) sharing the model: not ours
                return
            x = args[0][mask_box["mask"]].float()  # [n_tok, d_k] non-pad tokens only
            sums[name] += (x.T @ x).double()
            if layer_of[name] == deepest and name == last_name:
                raise _Stop
        return fn

    last_name = [n for n in modules if layer_of[n] == deepest][-1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    n_tok = 0
    try:
        batch: list[list[int]] = []
        for text in list(texts) + [None]:
            if text is not None:
                ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
                if ids:
                    batch.append(ids)
            if batch and (len(batch) == batch_size or text is None):
                input_ids, mask = right_pad(batch, pad)
                mask = mask.bool()
                mask_box["mask"] = mask.to(device)
                try:
                    with torch.no_grad():
                        model(input_ids=input_ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
                except _Stop:
                    pass
                n_tok += int(mask.sum())
                batch = []
                if max_tokens is not None and n_tok >= max_tokens:
                    break
    finally:
        for h in handles:
            h.remove()
    if n_tok == 0:
        raise StatsError("the stats corpus produced no tokens")
    return {n: SecondMoment(n, (s / n_tok).float().cpu(), n_tok,
                            {"layer": layer_of[n], "model": model_id(model)}) for n, s in sums.items()}


# ---- on-disk cache -------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """$HIEDIT_HOME/cache/rlsedit-stats, else the platform's user cache dir for hiedit."""
    home = os.environ.get("HIEDIT_HOME")
    if home:
        return Path(home) / "cache" / "rlsedit-stats"
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("hiedit")) / "rlsedit-stats"
    except ImportError:  # platformdirs is a dependency, but keep the editor usable without it
        return Path.home() / ".cache" / "hiedit" / "rlsedit-stats"


def cached_second_moments(model: nn.Module, tokenizer, modules: dict[str, nn.Linear],
                          corpus: str | Path | None = None, cache_dir: str | Path | None = None,
                          max_tokens: int | None = 200_000, max_length: int = 128,
                          batch_size: int = 16) -> dict[str, SecondMoment]:
    """Σ̂ of every module, read from ``cache_dir`` or collected (one pass for all misses) and cached.

    Layout: ``<cache_dir>/<model>-<fingerprint[:16]>/<module>.<corpus tag>.safetensors`` (+ .json),
    where the corpus tag hashes the corpus bytes and the sampling limits.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus_path = str(Path(corpus).resolve()) if corpus is not None else str(DEFAULT_CORPUS)
    tag = hashlib.sha256(json.dumps([corpus_digest(corpus), max_tokens, max_length]).encode()).hexdigest()[:12]
    safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id(model))[:64]
    paths, found, missing = {}, {}, {}
    for name, module in modules.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        fp = stats_fingerprint(model, layer)
        paths[name] = cache_dir / f"{safe_model}-{fp[:16]}" / f"{name}.{tag}.safetensors"
        if paths[name].is_file():
            found[name] = SecondMoment.load(paths[name], model, name)
        else:
            missing[name] = module
    if missing:
        fresh = collect_second_moments(model, tokenizer, missing, read_corpus(corpus), max_tokens, max_length,
                                       batch_size)
        for name, stat in fresh.items():
            stat.meta.update(fingerprint=stats_fingerprint(model, stat.meta["layer"]), corpus=corpus_path,
                             corpus_sha256=corpus_digest(corpus), max_tokens=max_tokens, max_length=max_length)
            stat.save(paths[name])
            found[name] = stat
    return {n: found[n] for n in modules}


def load_second_moments(path: str | Path, model: nn.Module, modules: Iterable[str]) -> dict[str, SecondMoment]:
    """Σ̂ for ``modules`` from a statistics directory (one ``<module>.*.safetensors`` each) or a single file.

    Every file is checked against ``model``: StatsMismatch for one collected on another model.
    """
    path = Path(path)
    modules = list(modules)
    if path.is_file():
        if len(modules) != 1:
            raise StatsError(f"{path} holds statistics of one module; the editor needs {len(modules)}: "
                             "pass a directory with one file per module")
        return {modules[0]: SecondMoment.load(path, model, modules[0])}
    if not path.is_dir():
        raise StatsError(f"statistics path {path} does not exist")
    out = {}
    for name in modules:
        hits = sorted(path.rglob(f"{name}.*safetensors"))
        if len(hits) != 1:
            raise StatsError(f"statistics directory {path} has {len(hits)} files for {name}; expected exactly one")
        out[name] = SecondMoment.load(hits[0], model, name)
    return out
