"""``hiedit train``: train a HiEdit (or RLEdit, k = L) editor for a model on an editing dataset.

    hiedit train --model DIR --data counterfact-train.json --limit 300 --layers 'gate[21-28],up[21-28]' \
        --epochs 2 --block-lr 1e-4 --threads 1 --seed 0 --out runs/smol          # SmolLM2's editor (docs/models.md)
    hiedit train ... --k 16 --out runs/smol-rledit                               # RLEdit: k = L, same recipe
    hiedit train ... --out runs/smol --resume            # continue a stopped run (same data and options)

Checkpoints (the editor plus the optimiser state) are written to ``--out`` after every
trajectory; ``--resume`` continues from them. A checkpoint made for another base model,
another ``--layers`` or another ``--k`` is refused.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from editor_core.train import TrainConfig

_FIELDS = TrainConfig()


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model directory or hub id (default: the demo model)")
    parser.add_argument("--data", required=True, help="editing dataset: ZsRE (MEND format) or CounterFact")
    parser.add_argument("--layers", required=True,
                        help="editable modules, e.g. 'gate[21-28],up[21-28]' (SmolLM2's, docs/models.md)")
    parser.add_argument("--k", type=int, help="modules edited per fact (default L/2; k = L trains RLEdit)")
    parser.add_argument("--out", required=True, help="output directory (editor + checkpoints)")
    parser.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    parser.add_argument("--limit", type=int, help="use only the first N records of --data (after --offset); "
                                                  "ZsRE: --limit 500 trains on the half hiedit eval leaves out")
    parser.add_argument("--offset", type=_non_negative_int, default=0, help="skip the first N records of --data")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad records (and count them) instead of failing")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the nets' initialisation, η_0's calibration facts and the trajectory order; "
                             "replicates are editors of several seeds (docs/results.md)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", help="base model dtype (float32, bfloat16, float16); "
                                                           "the editor nets stay float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g = parser.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=_FIELDS.epochs, help="passes over the records")
    g.add_argument("--traj-len", type=int, default=_FIELDS.traj_len,
                   help="N: edits per trajectory, kept applied along it")
    g.add_argument("--trajectories", type=int, help="trajectories per epoch (default: all records / --traj-len)")
    g.add_argument("--update", choices=["trajectory", "per_edit"], default=_FIELDS.update,
                   help="trajectory: one update per trajectory (HiEdit, RLEdit); per_edit: after every edit, "
                        "no RL (the MEND baseline)")
    g.add_argument("--stop-after", type=int, help="stop after this many trajectories (continue with --resume)")
    g = parser.add_argument_group("loss (the paper's Eq. 4)")
    g.add_argument("--back-depth", type=int, default=_FIELDS.back_depth, help="K: earlier edits replayed per step")
    g.add_argument("--time-decay", type=float, default=_FIELDS.time_decay, help="μ: weight μ^j of the j-th earlier edit")
    g.add_argument("--loc-coef", type=float, default=_FIELDS.loc_coef, help="α: weight of the locality KL")
    g.add_argument("--reg-coef", type=float, default=_FIELDS.reg_coef, help="λ: weight of ‖ΔW‖²")
    g = parser.add_argument_group("editor")
    g.add_argument("--meta-lr", type=float, default=_FIELDS.meta_lr, help="Adam lr of the editor nets and router")
    g.add_argument("--block-lr", type=float, default=_FIELDS.block_lr,
                   help="Adam lr of the MEND blocks (A, B, b, s); 0 keeps them at identity. The real-model editors "
                        "use 1e-4 (docs/models.md)")
    g.add_argument("--rank", type=int, default=_FIELDS.rank, help="rank of the MEND blocks")
    g.add_argument("--tokens", choices=["all", "target"], default=_FIELDS.tokens,
                   help="positions whose u, δ the editor sees: every token (MEND) or the target's (docs/models.md "
                        "compares the two on SmolLM2)")
    parser.add_argument("--publish", type=Path, metavar="DIR",
                        help="after training, also write the editor to DIR with its weights in float16 (half the "
                             "size; the committed editors are published this way) and without the optimiser state")
    parser.add_argument("--publish-tokens", choices=["all", "target"],
                        help="capture positions the published editor runs with (default: --tokens); the committed "
                             "SmolLM2 and Gemma editors are trained with all and served with target (docs/models.md)")
    parser.add_argument("--eval-data", help="after training, measure single-edit efficacy on these records")
    parser.add_argument("--eval-n", type=int, default=50, help="records of --eval-data to measure")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs of background runs)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, trajectories=args.trajectories, traj_len=args.traj_len,
                       update=args.update, stop_after=args.stop_after, back_depth=args.back_depth,
                       time_decay=args.time_decay, loc_coef=args.loc_coef, reg_coef=args.reg_coef,
                       meta_lr=args.meta_lr, block_lr=args.block_lr, rank=args.rank, tokens=args.tokens,
                       skip_bad=args.skip_bad)


def run(args: argparse.Namespace) -> int:
    import torch

    from editor_core.assets import DEMO_MODEL
    from editor_core.capture import EditInputError
    from editor_core.data import DatasetError, load_records
    from editor_core.efficacy import single_edit_efficacy
    from editor_core.hiedit import CheckpointMismatch
    from editor_core.model import LayerSpecError, load_model, resolve_modules
    from editor_core.train import TrainConfigError, train_editor
    from editor_core.train_data import BadRecord
    from editor_core.train_io import TRAIN_LOG_FILE

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = config_from_args(args)
        cfg.validate()
        model_path = args.model or DEMO_MODEL
        model, tokenizer = load_model(model_path, dtype=args.dtype, device=args.device)
        n_modules = len(resolve_modules(model, args.layers))
        k = args.k or max(1, n_modules // 2)
        limit = None if args.limit is None else args.offset + args.limit
        loaded = load_records(args.data, tokenizer=tokenizer, skip_bad=args.skip_bad, limit=limit)
        records = loaded.records[args.offset:]
        if loaded.skipped:
            print(f"skipped {loaded.skipped} bad records of {args.data}", file=sys.stderr)
        start = time.time()
        editor = train_editor(model, tokenizer, args.layers, k, records, Path(args.out), seed=args.seed,
                              cfg=cfg, progress=not args.no_progress, resume=args.resume)
        if args.publish is not None:
            if args.publish_tokens:
                editor.cfg.tokens = args.publish_tokens  # read per proposal: nothing else depends on it
            editor.save(args.publish, dtype=torch.float16)
        # the trainer leaves out records over the editor's token limits too: report what it trained on
        trained = json.loads((Path(args.out) / TRAIN_LOG_FILE).read_text())
        summary = {"out": str(args.out), "method": editor.method, "k": k, "modules": n_modules,
                   "records": trained["records"], "skipped": loaded.skipped + trained["skipped"],
                   "seconds": round(time.time() - start, 1)}
        if args.eval_data:
            eval_records = load_records(args.eval_data, tokenizer=tokenizer, skip_bad=True, limit=args.eval_n).records
            summary["single_edit_efficacy"] = single_edit_efficacy(editor, eval_records, progress=not args.no_progress)
        print(json.dumps(summary, indent=2))
        return 0
    except (DatasetError, BadRecord, TrainConfigError, CheckpointMismatch, LayerSpecError, EditInputError,
            FileNotFoundError) as e:
        print(f"hiedit train: error: {e}", file=sys.stderr)
        return 2
