# Sourced by the example scripts: `hiedit serve` (the defaults) on $PORT in a throwaway data directory, ready
# when this returns; sets HOME_DIR, URL and SERVER, and on exit stops the server and removes HOME_DIR and the
# paths in CLEANUP. A first start converts the model's GGUF and collects RLSEdit's statistics (minutes):
# MODELS_DIR=<a home>/models and STATS_DIR=<a home>/cache reuse those of an earlier start.
HOME_DIR=$(mktemp -d)
CLEANUP=${CLEANUP:-}
[ -n "${MODELS_DIR:-}" ] && ln -s "$MODELS_DIR" "$HOME_DIR/models"
[ -n "${STATS_DIR:-}" ] && ln -s "$STATS_DIR" "$HOME_DIR/cache"
URL=http://127.0.0.1:$PORT
hiedit serve --port "$PORT" --home "$HOME_DIR" --probe-every-seconds 0 >"$HOME_DIR/server.log" 2>&1 &
SERVER=$!
# shellcheck disable=SC2086  # CLEANUP is a list of paths
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true; rm -rf "$HOME_DIR" $CLEANUP; exit 0' EXIT
for _ in $(seq 1 1200); do curl -sf "$URL/readyz" >/dev/null 2>&1 && break; sleep 0.5; done
