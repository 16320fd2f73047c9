"""``hiedit build-demo``: rebuild the committed demo assets, seeded, from the shared data.

Stages (``--stage``):

* ``base``    the Llama-architecture base model + its locally trained tokenizer -> DEMO_MODEL,
              and the split of CounterFact facts -> DEMO_SPLIT;
* ``gemma``   the smaller Gemma-2-architecture twin (same facts, same tokenizer) -> DEMO_GEMMA;
* ``editors`` the HiEdit editor (k = L/2) -> DEMO_HIEDIT and the RLEdit editor (k = L) ->
              DEMO_RLEDIT, trained by ``editor_core.train.train_editor`` on the editor-training stream;
* ``all``     the three in that order.

The split (DEMO_SPLIT, JSON) takes the first ``N_EVAL + N_EDITOR + N_HELDOUT`` records of
``counterfact-edit.json`` in file order:

* ``eval``         records [0, 1000): the evaluation stream edited by ``hiedit eval``;
* ``editor_train`` records [1000, 1300): the facts the editors are trained on;
* ``heldout``      records [1300, 1400): known facts that are never edited nor used to train an
                   editor ("accuracy on unedited known facts").

The base model is trained on the true statements of all 1,400 (so every one is known before
any edit) plus the GLUE sentences outside the held-out perplexity part.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from editor_core.assets import DEMO, DEMO_GEMMA, DEMO_HIEDIT, DEMO_MODEL, DEMO_RLEDIT, DEMO_SPLIT
from editor_core.data import SHARED_DATA, EditRecord, glue_sentences, load_counterfact
from editor_core.model import parse_layer_spec
from editor_core.pretrain import PretrainConfig, pretrain

# Data: one file, so that a split is one list of case_ids per stream into one file.
DEMO_DATA = "counterfact/counterfact-edit.json"   # relative to ../shared/data
N_EVAL, N_EDITOR, N_HELDOUT = 1000, 300, 100
SEED = 0

# The editable modules of the demo editors. The demo Llama model has 6 decoder layers; HiEdit
# edits gate_proj/up_proj of the upper-middle layers (its Llama-3-8B setting is
# gate[11-15],up[18-24] of 32 layers), here layers 2-5 of both: L = 8 modules,
# HiEdit selects k = L/2 = 4 per edit, RLEdit uses all k = L = 8.
DEMO_LAYER_SPEC = "gate[2-5],up[2-5]"

# Base model: Llama-3 style (RoPE, GQA, SwiGLU, tied embeddings), ~4.7M parameters, 6 layers.
LLAMA_CONFIG = PretrainConfig(arch="llama", hidden=192, layers=6, intermediate=768, heads=4, kv_heads=2,
                              vocab_size=8192, steps=3500, batch_size=32, lr=3e-3, context_weight=0.02,
                              seed=SEED, eval_every=500)
# The Gemma-2 twin: smaller and trained for fewer steps (eager attention is slower on CPU).
GEMMA_CONFIG = PretrainConfig(arch="gemma2", hidden=128, layers=4, intermediate=384, heads=4, kv_heads=2,
                              vocab_size=8192, steps=2000, batch_size=32, lr=3e-3, context_weight=0.0,
                              sparse_logits=True, seed=SEED, eval_every=500)


class DemoBuildError(RuntimeError):
    """A stage cannot run (a missing prerequisite asset or module)."""


# --------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------

def demo_records(data_dir: Path = SHARED_DATA) -> tuple[list[EditRecord], dict[str, list[str]]]:
    """The 1,400 demo records (file order) and the streams {eval, editor_train, heldout} of case_ids."""
    path = data_dir / DEMO_DATA
    loaded = load_counterfact(path, limit=N_EVAL + N_EDITOR + N_HELDOUT)
    records = loaded.records
    if len(records) < N_EVAL + N_EDITOR + N_HELDOUT:
        raise DemoBuildError(f"{path}: {len(records)} records, need {N_EVAL + N_EDITOR + N_HELDOUT}")
    ids = [r.case_id for r in records]
    streams = {"eval": ids[:N_EVAL], "editor_train": ids[N_EVAL:N_EVAL + N_EDITOR],
               "heldout": ids[N_EVAL + N_EDITOR:]}
    return records, streams


def write_split(streams: dict[str, list[str]], path: Path = DEMO_SPLIT, accuracy: dict | None = None) -> None:
    split = {
        "data": DEMO_DATA,
        "format": "counterfact-flat",
        "seed": SEED,
        "description": ("case_ids of ../shared/data/" + DEMO_DATA + ": 'eval' is the evaluation stream "
                        "(edited one at a time by hiedit eval), 'editor_train' trains the HiEdit/RLEdit "
                        "editors, 'heldout' are known facts never edited nor trained on by an editor. The base "
                        "model was pretrained on the true statements (prompt, rephrase, locality) of all three."),
        "streams": streams,
        "pretraining": {"glue": "../shared/data/glue/{sst2,cola,mrpc,rte,nli}.json, split='train' "
                                "(editor_core.data.glue_sentences; 'heldout' is kept for perplexity)"},
    }
    if accuracy:
        split["base_model_accuracy"] = accuracy
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=1) + "\n")


def _groups(streams: dict[str, list[str]]) -> dict[str, set[str]]:
    return {name: set(ids) for name, ids in streams.items()}


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------

def _print_accuracy(name: str, acc: dict, seconds: float, n_params: int) -> None:
    print(f"{name}: {n_params / 1e6:.2f}M parameters, trained in {seconds / 60:.1f} min")
    print(f"  top-1 (teacher-forced, every answer token) on all {acc['n']} trained fact sentences: {acc['all']:.2f}%")
    print(f"  by kind: prompt {acc['prompt']:.2f}%, rephrase {acc['rephrase']:.2f}%, locality {acc['locality']:.2f}%")
    for stream in ("eval", "editor_train", "heldout"):
        if f"{stream}/all" in acc:
            print(f"  {stream}: all sentences {acc[f'{stream}/all']:.2f}%, prompts {acc[f'{stream}/prompt']:.2f}%")


def store_bf16(out_dir: Path, records: list[EditRecord], streams: dict[str, list[str]]) -> dict:
    """Rewrite the saved weights in bfloat16 (half the bytes in git) and measure the accuracy again
    on the model as ``load_model`` returns it (fp32 upcast of the bf16 weights): that is the model
    every consumer sees, so that is the figure reported."""
    import torch

    from editor_core.model import load_model
    from editor_core.pretrain import accuracy_report, fact_sentences

    model, tokenizer = load_model(out_dir)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    model, tokenizer = load_model(out_dir)
    facts, _ = fact_sentences(records)
    acc = accuracy_report(model, tokenizer, facts, _groups(streams))
    meta_path = out_dir / "pretrain.json"
    meta = json.loads(meta_path.read_text())
    meta["accuracy_fp32"] = meta.pop("accuracy")
    meta["accuracy"] = acc
    meta["stored_dtype"] = "bfloat16"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return acc


def stage_base(out_dir: Path, split_path: Path, cfg: PretrainConfig, progress: bool) -> dict:
    records, streams = demo_records()
    glue = list(glue_sentences("train"))
    result = pretrain(records, glue, cfg, out_dir=out_dir, groups=_groups(streams), progress=progress)
    acc = store_bf16(out_dir, records, streams)
    write_split(streams, split_path, accuracy=acc)
    _print_accuracy(f"Llama base model -> {out_dir} (bf16 weights)", acc, result.seconds, result.n_params)
    return acc


def stage_gemma(out_dir: Path, base_dir: Path, cfg: PretrainConfig, progress: bool) -> dict:
    """The Gemma-2 twin shares the base model's tokenizer, so the two read the same token ids."""
    from transformers import AutoTokenizer

    if not (base_dir / "tokenizer.json").is_file():
        raise DemoBuildError(f"{base_dir} has no tokenizer: run --stage base first")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    records, streams = demo_records()
    glue = list(glue_sentences("train"))
    result = pretrain(records, glue, cfg, out_dir=out_dir, tokenizer=tokenizer, groups=_groups(streams),
                      progress=progress)
    acc = store_bf16(out_dir, records, streams)
    _print_accuracy(f"Gemma-2 twin -> {out_dir} (bf16 weights)", acc, result.seconds, result.n_params)
    return acc


def stage_editors(base_dir: Path, split_path: Path, hiedit_dir: Path, rledit_dir: Path, layer_spec: str,
                  seed: int, progress: bool, which: tuple[str, ...] = ("hiedit", "rledit"),
                  resume: bool = False, epochs: int | None = None) -> None:
    """Train HiEdit (k = L/2) and RLEdit (k = L) on the editor-training stream of the split.

    epochs: passes over the facts (None = the trainer's default, ``TrainConfig.epochs``).
    """
    from editor_core.model import load_model
    from editor_core.train import TrainConfig, train_editor

    if not (base_dir / "config.json").is_file():
        raise DemoBuildError(f"{base_dir} has no model: run --stage base first")
    if not split_path.is_file():
        raise DemoBuildError(f"{split_path} is missing: run --stage base first")
    split = json.loads(split_path.read_text())
    model, tokenizer = load_model(base_dir)
    records, _ = demo_records()
    by_id = {r.case_id: r for r in records}
    train_records = [by_id[c] for c in split["streams"]["editor_train"]]
    n_modules = len(parse_layer_spec(layer_spec, model.config.num_hidden_layers))
    for name, out_dir, k in (("hiedit", hiedit_dir, max(1, n_modules // 2)), ("rledit", rledit_dir, n_modules)):
        if name not in which:
            continue
        t0 = time.time()
        print(f"training {name} editor: layers {layer_spec}, k = {k} of L = {n_modules}, "
              f"{len(train_records)} facts -> {out_dir}")
        cfg = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
        train_editor(model, tokenizer, layer_spec=layer_spec, k=k, records=train_records, out_dir=out_dir,
                     seed=seed, cfg=cfg, progress=progress, resume=resume)
        print(f"  {name} trained in {(time.time() - t0) / 60:.1f} min")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=("all", "base", "gemma", "editors"), default="all",
                        help="what to rebuild (editors need the base model and split)")
    parser.add_argument("--out", type=Path, default=DEMO,
                        help="asset folder: model/, gemma2/, hiedit/, rledit/ and split.json go under it")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of every stage")
    parser.add_argument("--steps", type=int, default=None, help="override the base model's pretraining steps")
    parser.add_argument("--gemma-steps", type=int, default=None, help="override the Gemma twin's steps")
    parser.add_argument("--layers", default=DEMO_LAYER_SPEC, help="layer spec of the demo editors")
    parser.add_argument("--editors", default="hiedit,rledit", help="which editors --stage editors trains")
    parser.add_argument("--editor-epochs", type=_positive_int, default=None,
                        help="--stage editors: epochs over the editor-training facts "
                             "(default: the trainer's, TrainConfig.epochs = 3)")
    parser.add_argument("--resume", action="store_true",
                        help="--stage editors: continue editor runs found in the output folders")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    model_dir, gemma_dir = out / DEMO_MODEL.name, out / DEMO_GEMMA.name
    hiedit_dir, rledit_dir, split_path = out / DEMO_HIEDIT.name, out / DEMO_RLEDIT.name, out / DEMO_SPLIT.name
    progress = not args.no_progress
    llama = replace(LLAMA_CONFIG, seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    gemma = replace(GEMMA_CONFIG, seed=args.seed, **({"steps": args.gemma_steps} if args.gemma_steps else {}))
    t0 = time.time()
    try:
        if args.stage in ("all", "base"):
            if model_dir.exists():
                shutil.rmtree(model_dir)
            print(f"[build-demo] base model: {asdict(llama)}")
            stage_base(model_dir, split_path, llama, progress)
        if args.stage in ("all", "gemma"):
            if gemma_dir.exists():
                shutil.rmtree(gemma_dir)
            print(f"[build-demo] Gemma-2 twin: {asdict(gemma)}")
            stage_gemma(gemma_dir, model_dir, gemma, progress)
        if args.stage in ("all", "editors"):
            which = tuple(x.strip() for x in args.editors.split(",") if x.strip())
            stage_editors(model_dir, split_path, hiedit_dir, rledit_dir, args.layers, args.seed, progress, which,
                          resume=args.resume, epochs=args.editor_epochs)
    except DemoBuildError as exc:
        print(f"hiedit build-demo: {exc}", file=sys.stderr)
        return 2
    print(f"[build-demo] done in {(time.time() - t0) / 60:.1f} min")
    return 0
