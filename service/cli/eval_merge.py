"""``hiedit eval-merge``: one table from several ``hiedit eval`` runs on the same stream.

    hiedit eval-merge runs/n1000 runs/n1000-rls --out runs/n1000-all
    hiedit eval-merge --mean runs/n1000-o1 runs/n1000-o2 runs/n1000-o3 --out runs/n1000-mean
    hiedit eval-merge docs/img/gemma-cf-n200 --drop memit-nohist --out docs/img/gemma-cf-n200

Each method starts from the base weights, so methods run in separate invocations (on one machine or
several) belong in one table when the runs agree on N, the scoring and the before-editing baseline;
runs that do not are refused. A method present in several runs takes its row from the last one.
Writes ``results.json`` (``setup.runs`` says which run each row came from), ``results.md`` and the
two plots into ``--out``, like ``hiedit eval``.

With ``--mean`` the runs are replicates of one comparison instead (the same facts in other orders,
``hiedit eval --order-seed``, on other thread counts, or with editors trained from other seeds,
``--editor`` / ``--rledit-editor``): each method's row is the mean over the runs,
with the range of each metric under ``spread`` (``editor_core.evaluate.average_results``). A RUN that is
itself a ``--mean`` output counts as its replicates (a third seed added to a published mean of two).

``--drop`` leaves methods out of the table, for a row whose method's code has changed since it was measured.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a hiedit eval output directory or its results.json; later runs replace earlier rows")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--mean", action="store_true",
                        help="the runs are replicates (same facts; other orders, thread counts or editor "
                             "training seeds): average each method over them instead of taking rows from the last run")
    parser.add_argument("--drop", default="", metavar="METHODS",
                        help="comma-separated methods to leave out of the table (rows measured by code since changed)")


def _load(run: str) -> dict:
    from editor_core.evaluate import MergeError

    path = Path(run)
    path = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: not a readable results.json ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict):
        raise MergeError(f"{path}: no 'methods' table (is it a hiedit eval results.json?)")
    return results


def run(args: argparse.Namespace) -> int:
    from editor_core.evaluate import MergeError, average_results, merge_results, write_reports

    combine = average_results if args.mean else merge_results
    drop = {m.strip() for m in args.drop.split(",") if m.strip()}
    try:
        parts = [_load(r) for r in args.runs]
        unknown = drop - {m for part in parts for m in part["methods"]}
        if unknown:
            raise MergeError(f"--drop: no run has {', '.join(sorted(unknown))}")
        for part in parts:
            part["methods"] = {m: row for m, row in part["methods"].items() if m not in drop}
        merged = combine(parts)
    except MergeError as e:
        print(f"hiedit eval-merge: {e} (runs in the order given: {', '.join(args.runs)})", file=sys.stderr)
        return 2
    print(write_reports(merged, args.out))
    print(f"wrote {Path(args.out) / 'results.json'}, results.md, metrics_vs_edits.png, module_selection.png",
          file=sys.stderr)
    return 0
