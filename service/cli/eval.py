"""``hiedit eval``: the sequential-editing benchmark from the command line.

    hiedit eval --methods hiedit,rledit,ft --n 200 --out runs/n200
    hiedit eval --model DIR --editor DIR --data counterfact.json --n 1000 --every 100 --out runs/x

With no model options it uses the demo assets: the demo base model, its HiEdit and RLEdit
editors, and the evaluation stream written in the demo split. Writes ``results.json``,
``results.md`` and two PNG plots into ``--out``, after every method (partial until the last).

Resumable: each finished method's row is cached in ``OUT/methods/<name>.json`` under a digest of
everything it depends on (model weights, stream, editors, options, torch threads, scoring version);
rerunning the same command takes finished rows from there and runs only the rest. A method stopped
midway continues from ``OUT/methods/<name>.partial/`` (its progress every ``--checkpoint-every`` edits).
MEMIT-style methods (rlsedit, memit-nohist, alphaedit) also log every edit's target value there
(``values.jsonl``, ~3 KB an edit): copied alone into a fresh ``OUT/methods/<name>.partial/`` on another
machine, the rerun starts from W^0 and replays those edits without MEMIT's value search (about 90% of an
edit's time), so a run longer than a machine's lease goes on across machines.

ZsRE (../shared/data/zsre/zsre_mend_train_1k.json, 1,000 records of the MEND ZsRE *train* split): the
protocol trains ZsRE editors on records 0-499 (``hiedit train --limit 500``) and evaluates on records
500-999 (``hiedit eval --offset 500 --n 500``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path

from editor_core.capture import EditInputError
from editor_core.data import DatasetError, EditRecord, SHARED_DATA, glue_sentences, load_records
from editor_core.hiedit import CheckpointMismatch
from editor_core.model import LayerSpecError


class EvalSetupError(ValueError):
    """The benchmark cannot start as asked (missing assets, unknown method, bad option)."""


def configure(parser: argparse.ArgumentParser) -> None:
    from editor_core.baselines import METHODS, default_methods

    parser.add_argument("--methods", default=",".join(default_methods()),
                        help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--n", type=int, default=200, help="facts edited one after another")
    parser.add_argument("--offset", type=int, default=0,
                        help="skip the first records of --data (ZsRE: --offset 500, the half not trained on)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--every", type=int, default=0, help="also score the edited facts every M edits (0: end only)")
    parser.add_argument("--model", help="base model directory or hub id (default: the demo model)")
    parser.add_argument("--editor", help="HiEdit checkpoint (default: the demo HiEdit editor)")
    parser.add_argument("--rledit-editor", help="RLEdit (k = L) checkpoint; trained and cached when not given "
                                                "and there is no demo one")
    parser.add_argument("--mend-editor", help="MEND-style checkpoint; trained and cached when not given")
    parser.add_argument("--data", help="editing dataset (ZsRE MEND format or CounterFact); default: the demo "
                                       "split's evaluation stream")
    parser.add_argument("--split", help="a demo-style split file (streams eval / editor_train / heldout of one "
                                        "data file) to take the streams from; default: the demo split when "
                                        "neither --model nor --data is given")
    parser.add_argument("--train-data", help="facts to train missing editors on (default: the demo split's "
                                             "editor-training facts, or --data records after the stream)")
    parser.add_argument("--n-train", type=int, default=None,
                        help="training facts for editors trained here (default: all available)")
    parser.add_argument("--n-known", type=int, default=200, help="unedited known facts for General Retention")
    parser.add_argument("--n-ppl", type=int, default=200, help="held-out GLUE sentences for General Retention")
    parser.add_argument("--glue-n", type=int, default=100,
                        help="examples of each GLUE/MMLU set for General Retention (0: perplexity only)")
    parser.add_argument("--glue-every", action="store_true",
                        help="also score the GLUE/MMLU sets at every --every point (default: at the end; "
                             "the curve's General Retention is then from perplexity alone)")
    parser.add_argument("--cache-dir", help="where trained baseline editors are cached (default: OUT/editors)")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad dataset records and count them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", help="base model dtype: float32, bfloat16 or float16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--order-seed", type=int, default=None,
                        help="edit the same N facts in a seeded random order (default: stream order); "
                             "runs with several order seeds are replicates of one comparison")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default, which OMP_NUM_THREADS sets). The scores "
                             "depend on it: another summation order flips near-tied router choices, and a "
                             "long edit stream amplifies them; results.json records the count")
    parser.add_argument("--batch-size", type=int, default=64, help="probes per scoring forward pass")
    parser.add_argument("--rls-layers", help="layer spec for rlsedit / memit-nohist (default: RLSEdit's own)")
    parser.add_argument("--rls-option", action="append", default=[], metavar="KEY=VALUE",
                        help="RLSEditConfig field for rlsedit / memit-nohist / alphaedit (repeatable), e.g. v_steps=10")
    parser.add_argument("--alpha-option", action="append", default=[], metavar="KEY=VALUE",
                        help="AlphaEditParams field for alphaedit (repeatable): null_rel, l2_rel")
    parser.add_argument("--fresh", action="store_true", help="ignore the cached rows in OUT/methods and rerun")
    parser.add_argument("--checkpoint-every", type=int, default=100, metavar="M",
                        help="write a method's progress to OUT/methods/NAME.partial every M edits, so a stopped "
                             "run continues from there (0: never; not with --fresh)")
    parser.add_argument("--train-option", action="append", default=[], metavar="KEY=VALUE",
                        help="TrainConfig field for editors trained here (repeatable), e.g. epochs=1")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs of background runs)")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _options(items: list[str], kind: str) -> dict:
    """``["epochs=2", "traj_len=10"]`` -> {"epochs": 2, "traj_len": 10}, checked against the config's fields.

    kind: "train" (TrainConfig, for editors trained here), "rls" (RLSEditConfig) or "alpha" (AlphaEditParams).
    """
    if not items:
        return {}
    from dataclasses import fields

    if kind == "train":
        from editor_core.train import TrainConfig as config
    elif kind == "alpha":
        from editor_core.alphaedit import AlphaEditParams as config
    else:
        from editor_core.rlsedit import RLSEditConfig as config
    known = {f.name for f in fields(config)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise EvalSetupError(f"--{kind}-option {item!r}: expected KEY=VALUE with KEY one of {sorted(known)}")
        out[key] = _parse_value(value)
    return out


def _demo_split(path: Path) -> tuple[Path, list[str], list[str], list[str]]:
    """(data file, editor-training, evaluation, held-out known case ids) from the demo split file.

    The split (editor_core/demo.py) is ``{"data": path under ../shared/data, "streams": {"eval": [...],
    "editor_train": [...], "heldout": [...]}}``; "heldout" facts are known to the base model and never
    edited nor used to train an editor (General Retention). Without it, editor-training facts serve.
    """
    split = json.loads(path.read_text())
    data = split.get("data") or split.get("data_file") or split.get("source")
    if data is None:
        raise EvalSetupError(f"{path}: no 'data' entry naming the CounterFact file the split refers to")
    data_path = Path(data)
    if not data_path.is_absolute():
        for base in (path.parent, SHARED_DATA.parent, SHARED_DATA, SHARED_DATA / "counterfact"):
            if (base / data_path).is_file():
                data_path = base / data_path
                break
    streams = split.get("streams", split)

    def ids(*names: str) -> list[str]:
        for name in names:
            if isinstance(streams.get(name), list):
                return [str(x) for x in streams[name]]
            if isinstance(split.get(name), list):
                return [str(x) for x in split[name]]
        raise EvalSetupError(f"{path}: none of the lists {names} is present")

    train = ids("editor_train", "train", "editor-training")
    try:
        heldout = ids("heldout", "known")
    except EvalSetupError:
        heldout = train
    return data_path, train, ids("eval", "evaluation", "test"), heldout


def _probe_fields(rec: EditRecord) -> list[tuple[str, str, str]]:
    """(prompt field, target field, ...) pairs the harness teacher-forces, as EditRecord field names."""
    pairs = [("prompt", "target_new"), ("rephrase", "target_new"), ("locality_prompt", "locality_target")]
    if rec.target_true:
        pairs.append(("prompt", "target_true"))
    return pairs


def check_scorable(loaded, path, tokenizer, skip_bad: bool) -> tuple[list[EditRecord], int]:
    """Keep the records whose probes fit the scorer's token limits.

    The loaders already refuse missing fields, empty targets and unencodable text; this catches
    what only teacher forcing sees (a prompt or target over the token limits). Without
    ``skip_bad`` the first such record raises DatasetError naming file, record index and field.
    """
    from editor_core.capture import teacher_forced
    from editor_core.data import CF_FLAT_SOURCES, CF_ROME_SOURCES, ZSRE_SOURCES

    sources = {"zsre-mend": ZSRE_SOURCES, "counterfact-rome": CF_ROME_SOURCES}.get(loaded.format, CF_FLAT_SOURCES)
    kept, bad = [], 0
    for index, rec in enumerate(loaded.records):
        try:
            for prompt_field, target_field in _probe_fields(rec):
                field = prompt_field
                try:
                    teacher_forced(tokenizer, getattr(rec, prompt_field), getattr(rec, target_field))
                except EditInputError as exc:
                    field = target_field if str(exc).startswith("target") else prompt_field
                    raise
        except EditInputError as exc:
            if not skip_bad:  # without skipping, loaded.records[index] is record ``index`` of the file
                raise DatasetError(path, index, sources.get(field, field), str(exc).split(": ", 1)[-1]) from None
            bad += 1
            continue
        kept.append(rec)
    return kept, bad


def _by_case(records: list[EditRecord], case_ids: list[str], path: Path) -> list[EditRecord]:
    index = {r.case_id: r for r in records}
    missing = [c for c in case_ids if c not in index]
    if missing:
        raise EvalSetupError(f"{path}: {len(missing)} case ids of the demo split are not in the data "
                             f"(first: {missing[:3]})")
    return [index[c] for c in case_ids]


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (DatasetError, CheckpointMismatch, LayerSpecError, EditInputError, EvalSetupError,
            FileNotFoundError) as exc:
        print(f"hiedit eval: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    import torch

    from editor_core.assets import DEMO_HIEDIT, DEMO_MODEL, DEMO_RLEDIT, DEMO_SPLIT
    from editor_core.baselines import METHODS, FTConfig, MethodContext
    from editor_core.evaluate import Bench, EvalConfig, run_benchmark, write_reports
    from editor_core.general import load_glue
    from editor_core.model import load_model, model_id
    from editor_core.state import NoDeltas, WeightState

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise EvalSetupError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if args.n < 1:
        raise EvalSetupError("--n must be at least 1")
    if args.offset < 0 or args.glue_n < 0 or args.checkpoint_every < 0:
        raise EvalSetupError("--offset, --glue-n and --checkpoint-every must be >= 0")
    if args.offset and not args.data:
        raise EvalSetupError("--offset applies to --data (a dataset file), not to a split")
    if args.threads < 0:
        raise EvalSetupError("--threads must be 0 (torch's default) or a positive count")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    progress = not args.no_progress
    demo = args.model is None
    if demo:
        if not (DEMO_MODEL / "config.json").is_file() or not (DEMO_HIEDIT / "config.json").is_file():
            raise EvalSetupError(f"the demo assets are not built ({DEMO_MODEL}, {DEMO_HIEDIT}): run `hiedit build-demo`"
                                 " or pass --model and --editor")
        model_path, editor_dir = DEMO_MODEL, Path(args.editor) if args.editor else DEMO_HIEDIT
        rledit_dir = Path(args.rledit_editor) if args.rledit_editor else (
            DEMO_RLEDIT if (DEMO_RLEDIT / "config.json").is_file() else None)
    else:
        if not args.editor:
            raise EvalSetupError("--model needs --editor: the HiEdit checkpoint trained for that model")
        model_path, editor_dir = args.model, Path(args.editor)
        rledit_dir = Path(args.rledit_editor) if args.rledit_editor else None
    print(f"loading {model_path} ({args.dtype}, {args.device})", file=sys.stderr)
    model, tokenizer = load_model(model_path, args.dtype, args.device)

    # ---- the stream, the unedited known facts and the training facts -----------------------------
    if args.data and args.split:
        raise EvalSetupError("--data and --split are alternatives: give one")
    if not demo and not args.data and not args.split:
        raise EvalSetupError("--model needs --data (an editing dataset) or --split (a demo-style split file)")
    if args.data:
        # Only the stream and the known facts are needed unless an editor is trained here from the records
        # after them (tokenizer checks of a 10,000-record file take minutes on a busy machine).
        trains_here = ("mend" in methods and not args.mend_editor) or ("rledit" in methods and rledit_dir is None)
        # A margin, so that records the scorer drops below (over its token limits) are replaced as they would
        # be from the whole file: the stream and the known facts are the same either way.
        limit = None if trains_here and not args.train_data else \
            args.offset + args.n + args.n_known + 64 + (args.n + args.n_known) // 10
        loaded = load_records(args.data, tokenizer=tokenizer, skip_bad=args.skip_bad, seed=args.seed, limit=limit)
        file_index = {id(r): i for r, i in zip(loaded.records, loaded.indices)}
        records, too_long = check_scorable(loaded, args.data, tokenizer, args.skip_bad)
        loaded.skipped += too_long
        if loaded.skipped:
            print(f"skipped {loaded.skipped} bad records of {args.data}", file=sys.stderr)
        # --offset counts records of the file (a skipped record still takes its place): ZsRE --offset 500
        # is records 500-999 whatever the tokenizer refuses.
        records = [r for r in records if file_index[id(r)] >= args.offset]
        if not records:
            raise EvalSetupError(f"--offset {args.offset}: {args.data} has no usable record from there on")
        stream = records[:args.n]
        rest = records[args.n:]
        known = rest[:args.n_known]
        train = rest[args.n_known:][:args.n_train]  # [:None] = all
        skipped_records = loaded.skipped
    else:
        split_path = Path(args.split) if args.split else DEMO_SPLIT
        if not split_path.is_file():
            raise EvalSetupError(f"{split_path} is missing: pass --data or --split, or rebuild the demo assets")
        data_path, train_ids, eval_ids, known_ids = _demo_split(split_path)
        # Tokenizer checks cost time on a 10k-record file: run them only up to the last record the
        # split uses (the fields of every record are still checked by the first, cheap pass).
        needed = set(eval_ids[:args.n]) | set(train_ids) | set(known_ids)
        plain = load_records(data_path, skip_bad=True, seed=args.seed).records
        last = max((i for i, r in enumerate(plain) if r.case_id in needed), default=len(plain) - 1)
        loaded = load_records(data_path, tokenizer=tokenizer, skip_bad=args.skip_bad, seed=args.seed,
                              limit=last + 1)
        usable, too_long = check_scorable(loaded, data_path, tokenizer, args.skip_bad)
        loaded.skipped += too_long
        if loaded.skipped:
            print(f"skipped {loaded.skipped} bad records of {data_path}", file=sys.stderr)
        by_case = {r.case_id: r for r in usable}
        stream = [by_case[c] for c in eval_ids if c in by_case][:args.n]
        if not args.skip_bad:
            _by_case(loaded.records, sorted(needed), data_path)  # every split id must exist
        # Editors trained here (mend; rledit without a checkpoint) see the same facts as HiEdit.
        train = [by_case[c] for c in train_ids if c in by_case][:args.n_train]
        known = [by_case[c] for c in known_ids if c in by_case][:args.n_known]
        skipped_records = loaded.skipped
    if args.train_data:
        train = load_records(args.train_data, tokenizer=tokenizer, skip_bad=args.skip_bad,
                             seed=args.seed).records[:args.n_train]
    if len(stream) < args.n:
        print(f"warning: only {len(stream)} facts available for the stream (asked for {args.n})", file=sys.stderr)
    if args.order_seed is not None:
        # The same facts in another order. Routing and interference depend on the order, so one order
        # is one sample; Edited Retention then re-scores the first 10% of this order.
        order = torch.randperm(len(stream), generator=torch.Generator().manual_seed(args.order_seed)).tolist()
        stream = [stream[i] for i in order]
    counterfact = all(r.target_true for r in stream)
    try:
        ppl_texts = list(islice(glue_sentences("heldout", seed=0), args.n_ppl)) if args.n_ppl > 0 else []
    except DatasetError as exc:
        print(f"warning: no GLUE text for perplexity ({exc}); General Retention uses known facts only",
              file=sys.stderr)
        ppl_texts = []

    # ---- methods ---------------------------------------------------------------------------------
    ctx = MethodContext(model=model, tokenizer=tokenizer, hiedit_dir=editor_dir, rledit_dir=rledit_dir,
                        mend_dir=Path(args.mend_editor) if args.mend_editor else None, train_records=train,
                        cache_dir=Path(args.cache_dir) if args.cache_dir else out / "editors", seed=args.seed,
                        ft=FTConfig(), rls_layers=args.rls_layers, progress=progress,
                        train_options=_options(args.train_option, "train"),
                        rls_options=_options(args.rls_option, "rls"),
                        alpha_options=_options(args.alpha_option, "alpha"))
    ctx.hiedit()  # refuse a mismatched checkpoint before anything runs
    for name, directory in (("rledit", rledit_dir), ("mend", ctx.mend_dir)):
        if name in methods and directory is not None:
            ctx.load_same_spec(directory, name)  # and a baseline editor of another model or layer spec
    try:
        glue = load_glue(args.glue_n) if args.glue_n > 0 else []
    except DatasetError as exc:
        raise EvalSetupError(f"the GLUE/MMLU sets for General Retention: {exc} (or pass --glue-n 0)") from None
    states: dict[tuple[str, ...], WeightState] = {}

    def state_for(editor) -> WeightState:
        key = tuple(editor.modules)
        if key not in states:
            states[key] = WeightState(resolve_modules_by_name(model, editor.modules), model_id(model), NoDeltas())
        return states[key]

    cfg = EvalConfig(every=args.every, batch_size=args.batch_size, skip_bad=args.skip_bad, progress=progress,
                     seed=args.seed, glue_every=args.glue_every, checkpoint_every=args.checkpoint_every)
    started = time.time()
    bench = Bench(model, tokenizer, stream, known, ppl_texts, counterfact, glue)
    key_of = _cache_keys(args, model, ctx, stream, known, ppl_texts, glue, cfg,
                         {"editor": editor_dir, "rledit": rledit_dir, "mend": ctx.mend_dir})
    setup = {
        "model": str(model_path), "model_id": model_id(model), "editor": str(editor_dir),
        "rledit_editor": str(rledit_dir) if rledit_dir else None, "layer_spec": ctx.layer_spec,
        "data": str(args.data) if args.data else f"{args.split or DEMO_SPLIT} (eval stream)",
        "dtype": args.dtype, "device": args.device, "seed": args.seed, "torch_threads": torch.get_num_threads(),
        "stream": [r.case_id for r in stream],
        "skipped_records": skipped_records,
        "n_train_for_trained_editors": len(train),
        "ft": ctx.ft.__dict__, "argv": sys.argv[1:], "offset": args.offset,
        "zsre_split": "records 0-499 train the ZsRE editors, 500-999 are evaluated" if not counterfact else None,
    }

    def partial(results: dict) -> None:
        done = {**results, "order_seed": args.order_seed,
                "setup": {**setup, "wall_s": round(time.time() - started, 1)}}
        if len(results["methods"]) < len(methods):
            done["partial"] = f"{len(results['methods'])} of {len(methods)} methods: {', '.join(methods)}"
        write_reports(done, out)

    def build(name: str):
        try:
            return METHODS[name](ctx)
        except (CheckpointMismatch, LayerSpecError, DatasetError, EvalSetupError):
            raise
        except ValueError as exc:  # a method that cannot be set up as asked (e.g. an empty null space)
            raise EvalSetupError(f"{name}: {exc}") from None

    results = run_benchmark(bench, {n: (lambda n=n: build(n)) for n in methods}, state_for, cfg,
                            cache_dir=out / "methods", cache_key=None if args.fresh else key_of,
                            on_method=partial)
    results["order_seed"] = args.order_seed  # eval-merge refuses to mix orders
    results["setup"] = {**setup, "wall_s": round(time.time() - started, 1)}
    print(write_reports(results, out))
    print(f"wrote {out / 'results.json'}, results.md, metrics_vs_edits.png, module_selection.png", file=sys.stderr)
    return 0


def _dir_digest(directory) -> str | None:
    """sha256 over an editor checkpoint's config and weights (None: no directory)."""
    import hashlib

    if directory is None:
        return None
    h = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.json")) + sorted(Path(directory).glob("*.safetensors")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _cache_keys(args, model, ctx, stream, known, ppl_texts, glue, cfg, editor_dirs: dict):
    """name -> digest of everything the method's row depends on (evaluate.run_benchmark's cache key)."""
    import hashlib
    from dataclasses import asdict

    import torch

    import editor_core
    from editor_core.evaluate import SCORE_VERSION
    from editor_core.hiedit import base_weights_fingerprint

    common = {
        "score_version": SCORE_VERSION, "model": base_weights_fingerprint(model, ctx.hiedit().module_map),
        "dtype": args.dtype, "device": args.device, "threads": torch.get_num_threads(), "seed": args.seed,
        "stream": [r.case_id for r in stream], "stream_text": hashlib.sha256(json.dumps(
            [[r.prompt, r.target_new, r.target_true, r.rephrase, r.locality_prompt, r.locality_target]
             for r in stream]).encode()).hexdigest(),
        "known": [r.case_id for r in known], "ppl": hashlib.sha256("\n".join(ppl_texts).encode()).hexdigest(),
        "glue": len(glue), "cfg": {k: v for k, v in asdict(cfg).items() if k not in ("progress", "checkpoint_every")},
        "editor": _dir_digest(editor_dirs["editor"]),
    }
    def source(*names: str) -> str:
        """Digest of the method's own code: a cached row of an editor whose code changed is rerun."""
        h = hashlib.sha256()
        for name in names:
            h.update((Path(editor_core.__file__).parent / f"{name}.py").read_bytes())  # the library's modules
        return h.hexdigest()

    from editor_core.alphaedit import AlphaEditParams
    from editor_core.rlsedit import RLSEditConfig

    rls = {"rls": asdict(RLSEditConfig(**ctx.rls_options)), "layers": ctx.rls_layers,
           "code": source("rlsedit", "memit", "stats", "capture")}
    trained = {"train": ctx.train_options, "train_cases": [r.case_id for r in ctx.train_records],
               "code": source("hiedit", "nets", "train", "capture")}
    per_method = {
        "hiedit": {"code": source("hiedit", "nets", "capture")},
        "random-k": {"code": source("hiedit", "nets", "capture", "baselines")},
        "gradnorm-k": {"code": source("hiedit", "nets", "capture", "baselines")},
        "rledit": {"rledit": _dir_digest(editor_dirs["rledit"]), **trained},
        "mend": {"mend": _dir_digest(editor_dirs["mend"]), **trained},
        "ft": {"ft": asdict(ctx.ft), "code": source("baselines", "capture")},
        "rlsedit": rls,
        "memit-nohist": rls,
        "alphaedit": {**rls, "alpha": asdict(AlphaEditParams(**ctx.alpha_options)),
                      "alpha_code": source("alphaedit")},
    }

    def key(name: str) -> str:
        blob = json.dumps({"method": name, **common, **per_method.get(name, {})}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    return key


def resolve_modules_by_name(model, names: list[str]):
    """{name: nn.Linear} for dotted module names (any editor's module list)."""
    from torch import nn

    out = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise LayerSpecError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        out[name] = module
    return out
