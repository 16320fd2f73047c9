#!/bin/sh
# hiedit container entrypoint.
#
#   serve ...     wait for the database (and Redis), apply migrations (`alembic upgrade head`),
#                 then exec `hiedit serve ...` (PID 1 stays the server, so SIGTERM reaches it)
#   migrate       wait for the database and apply migrations, then exit
#   --flag ...    shorthand for `serve --flag ...`
#   anything else is exec'd as is (`hiedit train ...`, `hiedit eval ...`, `sh`)
#
# Environment:
#   HIEDIT_DATABASE_URL     SQLAlchemy URL (postgresql+psycopg://...); unset = SQLite in $HIEDIT_HOME
#   HIEDIT_REDIS_URL        waited for when set
#   HIEDIT_MIGRATE          1 (default) = run `alembic upgrade head` before serving; 0 = skip
#   HIEDIT_DB_WAIT_TIMEOUT  seconds to wait for the database and Redis (default 120)
#   HIEDIT_ALEMBIC_CONFIG   alembic.ini to use (default /app/alembic.ini)
set -eu

if [ "$#" -eq 0 ]; then
    set -- serve
fi
case "$1" in
    -*) set -- serve "$@" ;;
esac

prepare() {
    # Waits for the database and Redis, then (unless HIEDIT_MIGRATE=0) runs
    # `alembic upgrade head` under a Postgres advisory lock, so a writer and replicas
    # starting together never migrate concurrently.
    if [ "${HIEDIT_MIGRATE:-1}" = "0" ]; then
        hiedit-bootstrap wait
    else
        hiedit-bootstrap migrate
    fi
}

case "$1" in
    serve)
        prepare
        exec hiedit "$@"
        ;;
    migrate)
        HIEDIT_MIGRATE=1 prepare
        ;;
    *)
        exec "$@"
        ;;
esac
