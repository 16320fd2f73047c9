"""Database engine, sessions, schema migrations, and how an unreachable database is told apart.

The schema is owned by Alembic (``migrations/``); the server upgrades the database to
``head`` when it starts, before it replays the log, so a fresh data directory just works.

An outage must cost a client a prompt 503, never a hang (docs/reliability.md): Postgres
connections are opened with a connect timeout and TCP keepalives, the pool pings a connection
before lending it, and :class:`Reachability` answers "can the log take a write now?" within a
bound of its own, even when a connection hangs (a network partition the kernel has not noticed).
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

# libpq/psycopg: connect_timeout has a floor of 2 s; the keepalives and tcp_user_timeout make the
# kernel drop a connection to a host that stopped answering after ~20 s instead of ~15 minutes.
POSTGRES_CONNECT_ARGS = {"connect_timeout": 2, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3,
                         "keepalives_count": 3, "tcp_user_timeout": 20_000}
POOL_TIMEOUT_S = 5  # waiting for a free pooled connection

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def make_engine(url: str) -> Engine:
    """A sync engine. SQLite: shared across threads, foreign keys on, WAL so readers don't block the writer."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # why: SQLite ignores FKs and uses a rollback journal by default
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged edit must survive a power cut
            cur.close()
        return engine
    connect_args = {}
    if url.startswith("postgresql"):  # libpq parameters; ones given in the URL win
        given = make_url(url).query
        connect_args = {k: v for k, v in POSTGRES_CONNECT_ARGS.items() if k not in given}
    return create_engine(url, pool_pre_ping=True, pool_timeout=POOL_TIMEOUT_S, connect_args=connect_args)


def is_unavailable(exc: BaseException) -> bool:
    """True for errors that mean "the database cannot be reached or dropped the connection"
    (503, retry later), as opposed to a bug or a constraint violation (which stay errors)."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def describe(exc: BaseException) -> str:
    """The driver's one-line reason, without SQLAlchemy's statement dump and background link."""
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


class Reachability:
    """``check()`` -> None when the database answered ``SELECT 1`` within ``timeout`` s, else the reason.

    The query runs on a daemon thread, so the caller never waits longer than ``timeout`` even if the
    connection hangs; while an earlier probe is still hanging, callers wait on that one (at most
    ``timeout`` each) instead of piling up new threads on a dead connection.
    """

    def __init__(self, sessions: sessionmaker[Session], timeout: float = 1.0):
        self.sessions = sessions
        self.timeout = timeout
        self._lock = threading.Lock()
        self._probe: concurrent.futures.Future | None = None
        self._ok_at = float("-inf")  # monotonic time of the last answer; a failure resets it

    def check(self, max_age: float = 0.0) -> str | None:
        """``max_age``: an answer that recent is good enough (reads); 0 asks again (writes)."""
        if max_age and time.monotonic() - self._ok_at < max_age:
            return None
        with self._lock:
            probe = self._probe
            if probe is None or probe.done():
                probe = self._probe = _on_daemon_thread(self._ping, "hiedit-db-check")
        try:
            probe.result(self.timeout)
        except concurrent.futures.TimeoutError:
            self._ok_at = float("-inf")
            return f"no answer within {self.timeout:g} s"
        except Exception as e:  # noqa: BLE001 - any failure to answer SELECT 1 is "unreachable"
            self._ok_at = float("-inf")
            return describe(e)
        self._ok_at = time.monotonic()
        return None

    def _ping(self) -> None:
        with self.sessions() as session:
            session.execute(text("SELECT 1"))


def _on_daemon_thread(fn: Callable[[], object], name: str) -> concurrent.futures.Future:
    """Run ``fn`` on a new daemon thread (one that can never hold up the process's exit)."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            fut.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: records are serialised after the commit that made them.
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind ``engine`` to ``revision`` (one transaction)."""
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)
