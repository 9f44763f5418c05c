#!/usr/bin/env bash
# The main job: set up, build the zoo (train, export, verify; resumable, so a rerun after a
# failure redoes only what is not up to date, and a built zoo costs seconds), serve it, run
# the demo clients against the server, stop it cleanly. ZOO_DIR and PORT may be overridden.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ZOO_DIR=${ZOO_DIR:-zoo}
RNNZOO=.venv/bin/rnnzoo

$RNNZOO zoo build --out "$ZOO_DIR"
cat "$ZOO_DIR/ZOO.md"

log=$(mktemp)
# Sessions outlive the server: they are kept in an embedded store (SQLite, WAL) under the zoo.
STATE_STORE=${STATE_STORE:-$ZOO_DIR/.sessions}
$RNNZOO serve --model-dir "$ZOO_DIR" --port "${PORT:-0}" --state-store "$STATE_STORE" >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 300); do
    target=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$log" | head -n 1)
    [ -n "$target" ] && break
    kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.2
done
[ -n "$target" ] || { echo "server did not start"; cat "$log"; exit 1; }
echo "server listening on $target"

$RNNZOO stream --target "$target" --model sine-rnn --steps 200 --plot "$ZOO_DIR/stream.png"
$RNNZOO generate --target "$target" --model char-lstm-deep --prompt "def " --max-tokens 200 --temperature 0.7 --seed 0
echo
$RNNZOO generate --target "$target" --model num2words --prompt "90210" --temperature 0

kill -TERM $server
wait $server
trap - EXIT
rm -f "$log"
echo "server stopped cleanly"
