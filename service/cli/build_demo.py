"""``hiedit build-demo``: rebuild the committed demo model, tokenizer and editors (``editor_core.demo``, seeded)."""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    from editor_core.demo import configure as demo_configure

    demo_configure(parser)


def run(args: argparse.Namespace) -> int:
    from editor_core.demo import run as demo_run

    return demo_run(args)
