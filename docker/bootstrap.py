#!/usr/bin/env python3
"""Start-up helper of the hiedit container (called by docker/entrypoint.sh).

    hiedit-bootstrap wait      wait until the database (and Redis, when HIEDIT_REDIS_URL is set) answer
    hiedit-bootstrap migrate   wait, then run `alembic upgrade head` against the same database

The database URL is HIEDIT_DATABASE_URL, or the server's default SQLite file in HIEDIT_HOME.
On PostgreSQL the migration runs while this process holds a session-level advisory lock, so a
writer and replicas that start at the same moment apply migrations one after the other (the
second finds the schema at head and does nothing).

Environment: HIEDIT_DB_WAIT_TIMEOUT (seconds, default 120), HIEDIT_ALEMBIC_CONFIG (default
/app/alembic.ini, else the alembic.ini next to this repository's docker/ directory).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

# Arbitrary constant shared by every hiedit container ("hiedit" in ASCII + 1).
MIGRATION_LOCK_KEY = 0x6869656469740001


def log(msg: str) -> None:
    print(f"hiedit-bootstrap: {msg}", file=sys.stderr, flush=True)


def database_url() -> str:
    url = os.environ.get("HIEDIT_DATABASE_URL")
    if url:
        return url
    home = os.environ.get("HIEDIT_HOME")
    if not home:
        try:
            from service.settings import default_home  # same default as the server
            home = str(default_home())
        except Exception:  # noqa: BLE001 - fall back to the current directory
            home = "."
    return f"sqlite:///{Path(home) / 'hiedit.db'}"


def sync_url(url: str) -> str:
    """The URL with a synchronous driver (the check and the lock need no event loop)."""
    return url.replace("+asyncpg", "+psycopg").replace("+aiosqlite", "")


def redacted(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url.split("@")[-1]


def timeout_s() -> float:
    return float(os.environ.get("HIEDIT_DB_WAIT_TIMEOUT", "120"))


def retry(what: str, attempt, deadline: float) -> None:
    delay = 0.5
    while True:
        try:
            attempt()
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            if time.monotonic() >= deadline:
                raise SystemExit(f"hiedit-bootstrap: gave up waiting for {what}: {exc}") from None
            log(f"waiting for {what}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def wait_for_database(url: str, deadline: float) -> None:
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(sync_url(url), poolclass=NullPool, connect_args=_connect_args(url))

    def attempt() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    try:
        retry(f"database {redacted(url)}", attempt, deadline)
    finally:
        engine.dispose()
    log(f"database {redacted(url)} is up")


def _connect_args(url: str) -> dict:
    return {"connect_timeout": 5} if url.startswith("postgresql") else {}


def wait_for_redis(deadline: float) -> None:
    url = os.environ.get("HIEDIT_REDIS_URL")
    if not url:
        return
    import redis

    def attempt() -> None:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        try:
            client.ping()
        finally:
            client.close()

    retry(f"redis {redacted(url)}", attempt, deadline)
    log("redis is up")


def alembic_config() -> Path:
    configured = os.environ.get("HIEDIT_ALEMBIC_CONFIG")
    candidates = [Path(configured)] if configured else [
        Path("/app/alembic.ini"), Path(__file__).resolve().parent.parent / "alembic.ini"]
    for path in candidates:
        if path.is_file():
            return path
    raise SystemExit(f"hiedit-bootstrap: no alembic.ini at {', '.join(map(str, candidates))}")


def run_alembic(url: str) -> None:
    ini = alembic_config()
    env = dict(os.environ, HIEDIT_DATABASE_URL=url)  # migrations/env.py reads this
    cmd = [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "head"]
    log(f"alembic upgrade head ({redacted(url)})")
    done = subprocess.run(cmd, cwd=str(ini.parent), env=env)
    if done.returncode != 0:
        raise SystemExit(f"hiedit-bootstrap: `alembic upgrade head` failed with exit code {done.returncode}")


def migrate(url: str) -> None:
    if not url.startswith("postgresql"):
        run_alembic(url)
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(sync_url(url), poolclass=NullPool, isolation_level="AUTOCOMMIT",
                           connect_args=_connect_args(url))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            try:
                run_alembic(url)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
    finally:
        engine.dispose()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("wait", "migrate"):
        print(__doc__, file=sys.stderr)
        return 2
    url = database_url()
    deadline = time.monotonic() + timeout_s()
    wait_for_database(url, deadline)
    wait_for_redis(deadline)
    if argv[1] == "migrate":
        migrate(url)
        log("migrations at head")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
