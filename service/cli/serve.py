"""``hiedit serve``: the HTTP service on uvicorn (DESIGN §5).

With no options it serves SmolLM2-135M-Instruct and its trained editor on 127.0.0.1:8000, logging
edits to SQLite under the data directory. Every flag also reads its ``HIEDIT_*`` variable;
a flag given on the command line wins.
"""
from __future__ import annotations

import argparse
import logging
import sys

# flag -> Settings field of the same name
_FLAGS: list[tuple[str, dict]] = [
    ("--host", dict(help="bind address (HIEDIT_HOST; default 127.0.0.1)")),
    ("--port", dict(type=int, help="port (HIEDIT_PORT; default 8000)")),
    ("--model", dict(help="smollm2-135m-instruct (default) | gemma-3-270m | a model directory | a .gguf file "
                          "(converted once into HIEDIT_HOME/models) | a hub id already in the local hub cache "
                          "(HIEDIT_MODEL)")),
    ("--editor", dict(help="HiEdit checkpoint directory, or 'none' (HIEDIT_EDITOR; default: the committed "
                           "editor of a named --model)")),
    ("--untrained-editor", dict(metavar="LAYER_SPEC",
                                help="instead of loading an editor, create an UNTRAINED one over these modules, "
                                     "e.g. 'gate[0-1],up[0-1]' (a scaled gradient step; for stand-ins and tests)")),
    ("--untrained-lr", dict(type=float, help="edit learning rate of --untrained-editor")),
    ("--untrained-k", dict(type=int, help="k of --untrained-editor (default L/2)")),
    ("--rlsedit", dict(choices=["auto", "on", "off"], help="RLSEdit method (HIEDIT_RLSEDIT; default auto)")),
    ("--rlsedit-layers", dict(metavar="LAYER_SPEC", help="RLSEdit modules, e.g. 'down[2-4]' (default: its own)")),
    ("--rlsedit-stats-tokens", dict(type=int, help="tokens of second-moment statistics RLSEdit collects")),
    ("--rlsedit-stats-corpus", dict(metavar="PATH", help="text RLSEdit's statistics are collected from: a "
                                    ".txt/.json/.jsonl file or a directory (HIEDIT_RLSEDIT_STATS_CORPUS; default: "
                                    "the repository's ../shared/data/glue)")),
    ("--rlsedit-stats", dict(metavar="DIR", help="RLSEdit statistics collected before, instead of a corpus "
                             "(HIEDIT_RLSEDIT_STATS)")),
    ("--rlsedit-overlap", dict(choices=["refuse", "allow"], help="RLSEdit next to HiEdit layers at or below its "
                               "own: refuse (default: off under --rlsedit auto, no start under on) or allow")),
    ("--role", dict(choices=["writer", "replica"], help="writer: accepts edits (one per deployment, "
                    "holds the Redis writer lock); replica: serves the writer's log, answers writes with 409 "
                    "(HIEDIT_ROLE; default writer)")),
    ("--redis-url", dict(help="Redis for the writer lock, idempotency keys and change notifications, e.g. "
                              "redis://host:6379/0 (HIEDIT_REDIS_URL; default: none, single process)")),
    ("--writer-url", dict(help="the writer's URL, named in a replica's 409 answers (HIEDIT_WRITER_URL)")),
    ("--database-url", dict(help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db "
                                 "(HIEDIT_DATABASE_URL; default sqlite under --home)")),
    ("--home", dict(help="data directory (HIEDIT_HOME; default: the user data dir)")),
    ("--dtype", dict(help="float32 | float16 | bfloat16 (HIEDIT_DTYPE)")),
    ("--device", dict(help="cpu | cuda | cuda:N (HIEDIT_DEVICE)")),
    ("--probe-every-edits", dict(type=int, help="recompute the probe report after N edits (0: never)")),
    ("--probe-every-seconds", dict(type=float, help="recompute the probe report every T seconds (0: never)")),
    ("--max-body-bytes", dict(type=int, help="bodies above this get 413")),
    ("--max-new-tokens", dict(type=int, help="largest max_new_tokens /generate accepts")),
    ("--max-prompt-tokens", dict(type=int, help="longest prompt (in tokens) edits and /generate accept")),
    ("--max-target-tokens", dict(type=int, help="longest edit target (in tokens, at most 32)")),
    ("--delta-norm-bound", dict(type=float, help="refuse an edit whose update of any module has a larger "
                                                 "Frobenius norm")),
    ("--edit-check", dict(choices=["refuse", "report"], help="an edit that does not take: refuse it (422, nothing "
                          "kept; default) or keep it and report how it fell short (HIEDIT_EDIT_CHECK)")),
    ("--edit-max-steps", dict(type=int, help="strengthening steps an edit that did not take may add (0: the "
                                             "proposal alone, checked; HIEDIT_EDIT_MAX_STEPS, default 10)")),
    ("--edit-max-delta-rel", dict(type=float, help="no strengthening beyond ‖ΔW‖_F = this share of ‖W‖_F per "
                                                   "module (HIEDIT_EDIT_MAX_DELTA_REL, default 0.15)")),
    ("--torch-threads", dict(type=int, help="torch intra-op threads")),
    ("--edit-rate-per-second", dict(type=float, help="per-key rate limit of POST /edits (0: none)")),
    ("--edit-burst", dict(type=int, help="POST /edits a key may send at once before the rate applies")),
]


def configure(parser: argparse.ArgumentParser) -> None:
    for flag, kwargs in _FLAGS:
        # SUPPRESS: an option not given stays unset, so HIEDIT_* or the Settings default applies
        parser.add_argument(flag, default=argparse.SUPPRESS, **kwargs)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace):
    from ..settings import Settings

    given = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"), None) for flag, _ in _FLAGS}
    return Settings(**{k: v for k, v in given.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from editor_core.catalog import ModelSourceError, resolve_model

    from ..api.security import AuthConfigError, check_bind_allowed, parse_api_keys
    from ..loading import ConfigError, check_assets
    from ..main import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
        # before anything heavy: an open server (no keys) is never reachable from outside the machine
        check_bind_allowed(settings.host, parse_api_keys(settings.api_keys))
        check_assets(settings)
        # A named model or a .gguf file is converted into HIEDIT_HOME/models on first use (once).
        resolve_model(settings.model, settings.home)
    except (AuthConfigError, ConfigError, ModelSourceError, ValidationError) as e:
        prefix = "invalid option: " if isinstance(e, ValidationError) else ""
        print(f"hiedit serve: {prefix}{e}", file=sys.stderr)
        return 2
    coordinator = None
    if settings.redis_url:
        from redis import RedisError

        from ..coordination import Coordinator, WriterLockHeld
        coordinator = Coordinator(settings.redis_url, settings.redis_prefix, settings.writer_lock_ttl_seconds)
        try:
            coordinator.ping()
            if settings.role == "writer":  # before loading the model: a second writer fails in a second
                coordinator.acquire_writer_lock()
        except WriterLockHeld as e:
            print(f"hiedit serve: {e}", file=sys.stderr)
            return 2
        except RedisError as e:
            print(f"hiedit serve: --redis-url {settings.redis_url}: Redis is not reachable ({e})", file=sys.stderr)
            return 2
    app = create_app(settings, coordinator=coordinator)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False)
    except SystemExit:  # uvicorn exits 3 when the lifespan fails; a start the app refused is a usage error
        if not app.state.startup_failure:
            raise
    if app.state.startup_failure:  # e.g. the edit log was written for another base model
        print(f"hiedit serve: {app.state.startup_failure}", file=sys.stderr)
        return 2
    return 0
