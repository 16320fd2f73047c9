"""``hiedit``: one command line for serving, training, evaluating and building assets.

Each subcommand lives in its own module of this package (serve.py, export.py, train.py, eval.py,
eval_merge.py, eval_progress.py, build_demo.py) exposing ``configure(parser)`` and ``run(args)``; modules are imported
only when their subcommand runs, so ``hiedit --help`` stays fast. ``python -m service.cli`` is the
same command (``__main__.py``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("service.cli.serve", "serve a model and its editor over HTTP (default: SmolLM2-135M-Instruct and its editor)"),
    "export": ("service.cli.export", "write a server's edits as a merged model or a PEFT LoRA adapter (vLLM, SGLang, "
                                     "transformers)"),
    "train": ("service.cli.train", "train a HiEdit editor by hierarchical RL on an editing dataset"),
    "eval": ("service.cli.eval", "sequential-editing benchmark: results.json, a table and plots"),
    "eval-merge": ("service.cli.eval_merge", "one table from several hiedit eval runs on the same stream"),
    "eval-progress": ("service.cli.eval_progress", "what a hiedit eval method stopped midway had measured"),
    "build-demo": ("service.cli.build_demo", "rebuild the committed demo model, tokenizer and editors (seeded)"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default only where it tells the reader something: not for an option that is
    off or unset by default, nor where the help already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="hiedit", description="Correct facts inside a served LLM.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        args = parser.parse_args(argv[:1] or ["--help"])
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    cmd_parser = argparse.ArgumentParser(prog=f"hiedit {name}", description=COMMANDS[name][1],
                                         formatter_class=_HelpFormatter)
    module.configure(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)
