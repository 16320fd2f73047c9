"""``hiedit export``: a server's edits as a merged model directory or a PEFT LoRA adapter.

Reads the edit log through the same settings as ``hiedit serve`` (HIEDIT_HOME, --database-url, --model,
--editor, ...), so it works on a stopped server's log or beside a running one; the weights are rebuilt
from the base model and the logged deltas exactly as a replay builds them. Prints the fingerprint of
the weights the export holds: with every applied edit it is GET /state's "fingerprint".
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .serve import _FLAGS

# the serve options that decide which weights a log describes, and where the log is
_SETTINGS_FLAGS = ("--model", "--editor", "--untrained-editor", "--untrained-lr", "--untrained-k", "--rlsedit",
                   "--rlsedit-layers", "--rlsedit-stats-tokens", "--database-url", "--home", "--dtype", "--device",
                   "--torch-threads")


def parse_edits(text: str) -> list[int] | None:
    """'all' -> None (every applied edit); 'none' -> []; '3,5-7' -> [3, 5, 6, 7]."""
    text = text.strip()
    if text == "all":
        return None
    if text == "none":
        return []
    ids: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 1 or last < first:
                raise ValueError
            ids.extend(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'all', 'none' or ids like '3,5-7'") from None
    return ids


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=["merged", "peft"],
                        help="merged: a Hugging Face model directory with the edits folded in (bit-identical to "
                             "the served weights); peft: a LoRA adapter holding only the edits")
    parser.add_argument("--out", required=True, help="directory to write (must not exist, or be empty)")
    parser.add_argument("--edits", type=parse_edits, default=None, metavar="IDS",
                        help="which applied edits: 'all' (default), 'none' (the base model) or ids like '3,5-7'")
    parser.add_argument("--rank", type=int, default=None,
                        help="peft only: truncate each module's update to this rank by SVD and report the error "
                             "(default: exact, rank = the sum of the edits' ranks)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    for flag, kwargs in _FLAGS:
        if flag in _SETTINGS_FLAGS:
            parser.add_argument(flag, default=argparse.SUPPRESS, **kwargs)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from sqlalchemy import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from .. import db
    from ..engine import EditEngine, EngineError
    from ..export import export
    from ..loading import ConfigError, load_all
    from ..metrics import Metrics
    from .serve import settings_from_args

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        url = make_url(settings.resolved_database_url)
        if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_file():
            raise ConfigError(f"no edit log at {url.database}: is --home / HIEDIT_HOME the server's?")
        print(f"loading {settings.model} ...", file=sys.stderr)
        model, tokenizer, editors, unavailable = load_all(settings)
        sql = db.make_engine(settings.resolved_database_url)
        engine = EditEngine(settings, model, tokenizer, editors, unavailable, db.make_sessionmaker(sql), Metrics())
        which = "every applied edit" if args.edits is None else f"{len(args.edits)} edits"
        print(f"exporting {which} of {url.render_as_string(hide_password=True)} as {args.format} ...", file=sys.stderr)
        result = export(engine, args.format, args.out, args.edits, args.rank, args.overwrite)
    except (ConfigError, ValidationError) as e:
        print(f"hiedit export: {e}", file=sys.stderr)
        return 2
    except EngineError as e:
        print(f"hiedit export: {e.detail}", file=sys.stderr)
        return 2
    except SQLAlchemyError as e:
        print(f"hiedit export: cannot read the edit log ({db.describe(e)}); is --database-url / HIEDIT_HOME "
              "the server's?", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"wrote {result.format} export of {len(result.edits)} edits to {result.path} in {result.seconds:.1f} s")
    if result.rank is not None:
        print(f"adapter rank {result.rank} (exact rank {result.exact_rank})")
    for name, err in result.errors.items():
        print(f"  {name}: relative Frobenius error {err:.3e}")
    print(f"fingerprint {result.fingerprint}")
    return 0
