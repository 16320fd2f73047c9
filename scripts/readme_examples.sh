#!/usr/bin/env bash
# Start `hiedit serve` (SmolLM2-135M-Instruct and its editor, the defaults) in a throwaway data dir, run one curl per endpoint,
# and print each command with its real output (markdown). The README's examples come from this.
#   bash scripts/readme_examples.sh > /tmp/examples.md
set -euo pipefail
PORT=${PORT:-8765}
# shellcheck source=scripts/throwaway_server.sh
source "$(dirname "$0")/throwaway_server.sh"

show() {  # show "title" curl-args...
  local title=$1; shift
  printf '\n%s\n\n```console\n$ curl -s' "$title"
  local a
  for a in "$@"; do
    case $a in -*) printf ' %s' "$a" ;; *) printf " '%s'" "${a//$URL/http://127.0.0.1:8000}" ;; esac
  done
  printf '\n'
  curl -s "$@" | python3 -c 'import json,sys; d=sys.stdin.read(); print(json.dumps(json.loads(d)) if d.startswith(("{","[")) else d)'
  printf '```\n'
}
J=(-H 'Content-Type: application/json')
show "Liveness and readiness:" "$URL/healthz"
show "" "$URL/readyz"
show "What the model says before any edit (greedy):" "$URL/generate?prompt=The%20capital%20of%20France%20is&max_new_tokens=3"
show "" "$URL/generate?prompt=The%20mother%20tongue%20of%20Danielle%20Darrieux%20is&max_new_tokens=3"
show "Record a specificity probe (an answer that must not change):" -X POST "${J[@]}" -d '{"prompt":"Michel Rocard is a native speaker of"}' "$URL/probes"
show "Correct a fact (201 + Location), with a rephrase it must also take on and a neighbour it must keep:" -X POST "${J[@]}" -H 'Idempotency-Key: demo-1' -d '{"prompt":"The mother tongue of Danielle Darrieux is","target":"English","rephrases":["Where Danielle Darrieux is from, people speak the language of"],"locality":[{"prompt":"Michel Rocard is a native speaker of","target":"French"}]}' "$URL/edits"
show "The model now continues with the new target:" "$URL/generate?prompt=The%20mother%20tongue%20of%20Danielle%20Darrieux%20is&max_new_tokens=3"
show "" "$URL/generate?prompt=Where%20Danielle%20Darrieux%20is%20from%2C%20people%20speak%20the%20language%20of&max_new_tokens=3"
show "...and its neighbour keeps its answer:" "$URL/generate?prompt=Michel%20Rocard%20is%20a%20native%20speaker%20of&max_new_tokens=3"
show "An edit that does not take is refused (422) and changes nothing; the log keeps the attempt:" -X POST "${J[@]}" -d '{"prompt":"The capital of France is","target":"Ouagadougou, Tombouctou and Kinshasa together","k":1}' "$URL/edits"
show "Same body via POST:" -X POST "${J[@]}" -d '{"prompt":"The mother tongue of Danielle Darrieux is","max_new_tokens":3}' "$URL/generate"
show "The edit record:" "$URL/edits/1"
show "Audit: every editable module, its router importance, whether it was selected, the delta's norm and rank:" "$URL/edits/1/layers"
show "List edits (newest first):" "$URL/edits?limit=5"
show "Probes and the specificity / retention report:" "$URL/probes"
show "" "$URL/probes/report?refresh=true"
show "State fingerprint (sha256 of the served editable weights):" "$URL/state"
show "OpenAI-compatible completion:" -X POST "${J[@]}" -d '{"prompt":"The mother tongue of Danielle Darrieux is","max_tokens":3,"temperature":0}' "$URL/v1/completions"
show "Roll the edit back (again -> 409):" -X POST "$URL/edits/1/rollback"
show "" -X POST "$URL/edits/1/rollback"
show "The original answer is back:" "$URL/generate?prompt=The%20mother%20tongue%20of%20Danielle%20Darrieux%20is&max_new_tokens=3"
show "Bad input is a 4xx naming the field:" -X POST "${J[@]}" -d '{"prompt":"The mother tongue of Danielle Darrieux is","target":"   "}' "$URL/edits"
show "Delete a probe:" -X DELETE "$URL/probes/1"
printf '\nPrometheus metrics (excerpt):\n\n```console\n$ curl -s http://127.0.0.1:8000/metrics | grep -E "^hiedit_(edits_total|active_edits|rollbacks_total|probe_specificity_ratio|edit_retention_ratio)"\n'
curl -s "$URL/metrics" | grep -E "^hiedit_(edits_total|active_edits|rollbacks_total|probe_specificity_ratio|edit_retention_ratio)" || true
printf '```\n'
