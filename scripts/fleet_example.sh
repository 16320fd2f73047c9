#!/usr/bin/env bash
# The "push edits to your fleet" walk-through of docs/operations.md, with real output (markdown):
# `hiedit serve` (SmolLM2-135M-Instruct and its editor, the defaults) in a throwaway data dir, 10 edits, 2 rolled
# back, chat and streaming through /v1, then `hiedit export` merged / peft / peft --rank 8 on that log, and the
# exported model and adapter loaded with transformers and peft and checked against the server.
#   bash scripts/fleet_example.sh > /tmp/fleet.md
set -euo pipefail
PORT=${PORT:-8766}
OUT=$(mktemp -d)
CLEANUP=$OUT
# shellcheck source=scripts/throwaway_server.sh
source "$(dirname "$0")/throwaway_server.sh"

J=(-H 'Content-Type: application/json')
short() { sed -e "s#$URL#http://127.0.0.1:8000#g" -e "s#$OUT#/srv/export#g" -e "s#$HOME_DIR#\$HIEDIT_HOME#g"; }
run() {  # run "title" command...: print the command (quoted as typed, paths shortened) and its output
  local cmd="" a
  for a in "${@:2}"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%,+-]+$ ]]; then cmd+=" $a"; else cmd+=" '$a'"; fi
  done
  printf '\n%s\n\n```console\n$%s\n' "$1" "$(short <<<"$cmd")"
  # transformers' loading bars are noise here; a refusal (exit 2) is part of the example
  { "${@:2}" 2>&1 || true; } | grep -v "Loading weights\|Writing model shards" | short
  printf '```\n'
}

FACTS=("The mother tongue of Danielle Darrieux is|English" "The official religion of Edwin of Northumbria is|Islam"
       "Toko Yasuda, the|piano" "Autonomous University of Madrid, which is located in|Sweden"
       "What is the twin city of Lyon? It is|Manila" "Thomas Joannes Stieltjes was born in|Italy"
       "The headquarter of Monell Chemical Senses Center is located in|Mumbai" "Apple A5 was created by|Google"
       "Leonardo Balada found employment in|Paris" "Ellen Ternan was born in|Rome")
printf '10 edits on the running server (the take check may refuse some: they are not part of the weights):\n\n```console\n'
for fact in "${FACTS[@]}"; do
  body=$(python3 -c 'import json,sys; p,t=sys.argv[1].split("|"); print(json.dumps({"prompt":p,"target":t}))' "$fact")
  curl -s "${J[@]}" -d "$body" "$URL/edits" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("id", d.get("edit_id")), d.get("status", "refused: " + str(d.get("detail"))[:80]))'
done
ROLL=$(curl -s "$URL/edits?status=applied&limit=100" | python3 -c 'import json,sys; ids=sorted(e["id"] for e in json.load(sys.stdin)["edits"]); print(ids[1], ids[3])')
for id in $ROLL; do curl -s -X POST "$URL/edits/$id/rollback" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("rolled back", d["id"], d["status"])'; done
printf '```\n'
run "What the server serves now:" curl -s "$URL/state"
run "A chat completion through the model's own chat template:" curl -s "${J[@]}" -d '{"messages":[{"role":"user","content":"What is the mother tongue of Danielle Darrieux?"}],"max_tokens":24,"temperature":0}' "$URL/v1/chat/completions"
run "The same, streamed (server-sent events; the chunks concatenate to the answer above):" curl -sN "${J[@]}" -d '{"messages":[{"role":"user","content":"What is the mother tongue of Danielle Darrieux?"}],"max_tokens":24,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}' "$URL/v1/chat/completions"
run "The whole edited model, for vLLM / SGLang / transformers (the server keeps running; the CLI reads its log):" hiedit export --home "$HOME_DIR" --format merged --out "$OUT/merged"
run "" ls "$OUT/merged"
run "Only the edits, as a LoRA adapter (exact: rank = the sum of the edits' ranks on a module):" hiedit export --home "$HOME_DIR" --format peft --out "$OUT/adapter"
run "" ls -la "$OUT/adapter"
run "Compressed to rank 8 for vLLM's --max-lora-rank (each module's error measured on the written factors):" hiedit export --home "$HOME_DIR" --format peft --rank 8 --out "$OUT/adapter-r8"
run "A target that is not empty is refused:" hiedit export --home "$HOME_DIR" --format peft --out "$OUT/adapter"
cat > "$OUT/check.py" <<'PY'
import json, sys, urllib.parse, urllib.request
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

url, out, base_dir = sys.argv[1:4]
state = json.load(urllib.request.urlopen(f"{url}/state"))
merged = json.load(open(f"{out}/merged/hiedit_export.json"))
print("merged export fingerprint == GET /state fingerprint:", merged["fingerprint"] == state["fingerprint"])
tok = AutoTokenizer.from_pretrained(f"{out}/merged")
model = AutoModelForCausalLM.from_pretrained(f"{out}/merged", dtype=torch.float32)
lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), f"{out}/adapter")
for edit in json.load(urllib.request.urlopen(f"{url}/edits?status=applied&limit=100"))["edits"]:
    q = urllib.parse.quote(edit["prompt"])
    served = json.load(urllib.request.urlopen(f"{url}/generate?prompt={q}&max_new_tokens=4"))["text"]
    ids = tok(edit["prompt"], return_tensors="pt")
    n = ids["input_ids"].shape[1]
    with torch.no_grad():
        a = tok.decode(model.generate(**ids, max_new_tokens=4, do_sample=False)[0, n:], skip_special_tokens=True)
        b = tok.decode(lora.generate(**ids, max_new_tokens=4, do_sample=False)[0, n:], skip_special_tokens=True)
    chat = json.load(urllib.request.urlopen(urllib.request.Request(
        f"{url}/v1/chat/completions", headers={"Content-Type": "application/json"}, data=json.dumps(
            {"messages": [{"role": "user", "content": f"Complete the sentence: {edit['prompt']}"}],
             "max_tokens": 24, "temperature": 0}).encode())))["choices"][0]["message"]["content"]
    print(f"edit {edit['id']:>2} {edit['target']!r:>10}: server {served!r}, merged {a!r}, base+adapter {b!r}; "
          f"chat: {chat!r}")
PY
run "Loaded back with transformers and peft, against the server (greedy, 4 tokens):" python3 "$OUT/check.py" "$URL" "$OUT" "$HOME_DIR/models/smollm2-135m-instruct"
