#!/usr/bin/env bash
# Does an installed hiedit (a wheel, outside the repository, as in the Docker image) have RLSEdit, and
# when it does not, does the start say why? Builds the wheel, installs it into a fresh venv under a temp
# dir (with --system-site-packages, so the torch, transformers and model packages already installed are
# used, never another torch), then starts `hiedit serve` from outside the repository three times:
#   1. HIEDIT_RLSEDIT_STATS_CORPUS unset (the default corpus is the repository's ../shared/data/glue)
#   2. HIEDIT_RLSEDIT_STATS_CORPUS=<empty path>  (the image's default path in an empty volume)
#   3. the same path with the GLUE files copied into it
# and prints, for each, GET /state's methods and unavailable, and the start's "is OFF" line.
#
#   bash scripts/wheel_rlsedit_check.sh                      # converts SmolLM2 once into the temp home (~100 s)
#   MODELS_DIR=~/.cache/hiedit-test/models STATS_DIR=~/.cache/hiedit-test/cache/rlsedit-stats \
#       bash scripts/wheel_rlsedit_check.sh                  # reuse converted models and collected statistics
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
glue="${GLUE_DIR:-$repo/../shared/data/glue}"
work="$(mktemp -d /tmp/hiedit-wheel-XXXXXX)"
port="${PORT:-8765}"
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; true' EXIT

pip wheel --quiet --no-deps --no-build-isolation "$repo" -w "$work/wheel"
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/pip" install --quiet --no-deps "$work"/wheel/*.whl
mkdir -p "$work/home/cache"
[ -n "${MODELS_DIR:-}" ] && ln -s "$MODELS_DIR" "$work/home/models"
[ -n "${STATS_DIR:-}" ] && ln -s "$STATS_DIR" "$work/home/cache/rlsedit-stats"
cd "$work"  # nothing of the repository on the path
"$work/venv/bin/python" -c "import service, editor_core.stats as s; print('installed:', service.__file__); \
print('default corpus:', s.DEFAULT_CORPUS, 'exists' if s.DEFAULT_CORPUS.exists() else 'absent')"

serve() {  # $1: label; the rest: environment assignments
  local label="$1"; shift
  env HIEDIT_HOME="$work/home" "$@" "$work/venv/bin/hiedit" serve --port "$port" --probe-every-seconds 0 \
      > "$work/$label.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do
    curl -sf "localhost:$port/readyz" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { echo "$label: the server exited"; tail -5 "$work/$label.log"; exit 1; }
    sleep 1
  done
  echo "== $label"
  curl -s "localhost:$port/state" | "$work/venv/bin/python" -c \
      "import json, sys; d = json.load(sys.stdin); print('methods:', d['methods']); print('unavailable:', d['unavailable'])"
  grep -o "rlsedit is OFF.\{0,120\}" "$work/$label.log" || echo "(no 'rlsedit is OFF' line)"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
}

serve no-corpus
serve empty-volume HIEDIT_RLSEDIT_STATS_CORPUS="$work/home/rlsedit-corpus"
mkdir -p "$work/home/rlsedit-corpus" && cp "$glue"/*.json "$work/home/rlsedit-corpus/"
serve corpus-in-volume HIEDIT_RLSEDIT_STATS_CORPUS="$work/home/rlsedit-corpus"
echo "logs: $work"
