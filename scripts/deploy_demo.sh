#!/usr/bin/env bash
# A deployment across machines, played on this one: a coordinator and three data owners on
# 127.0.0.1 with TLS and node authentication, each owner with its own slice of Dolly-15k,
# three rounds of FedAvg on the embedded model (configs/deploy_demo.toml). After
# `bash scripts/setup.sh`:
#   bash scripts/deploy_demo.sh [--dir DIR] [--dolly FILE] [--setup-only]
# DIR (default runs/deploy_demo; it must not exist yet) gets one directory per party with
# only what that party would hold on its own machine:
#   DIR/coordinator/  pki/ (ca.pem, ca.key, server.pem, server.key), nodes/owner_K.pub
#                     (received from the owners), heldout.jsonl, run/ (the run), coordinator.log
#   DIR/owner_K/      node.key, node.pub (sent), ca.pem (received), data.jsonl, state/, join.log
# --setup-only makes those files and prints each party's command without running it.
# FEDIT_VENV (default .venv) is the virtualenv fedit is installed in.
set -euo pipefail

DEFAULT_DIR=runs/deploy_demo
DIR=$DEFAULT_DIR
DOLLY=../shared/data/databricks-dolly-15k.jsonl
SETUP_ONLY=0
while [ $# -gt 0 ]; do
  case $1 in
    --dir) DIR=$(realpath -m -- "${2:?--dir needs a directory}"); shift 2 ;;
    --dolly) DOLLY=$(realpath -m -- "${2:?--dolly needs a file}"); shift 2 ;;
    --setup-only) SETUP_ONLY=1; shift ;;
    -h | --help) sed -n '2,13p' "$0" | cut -c3-; exit 0 ;;
    *) echo "deploy_demo: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."  # the repo root: the config's paths and the defaults are relative to it

VENV=${FEDIT_VENV:-.venv}
FEDIT=$VENV/bin/fedit
PY=$VENV/bin/python
CONFIG=configs/deploy_demo.toml
OWNERS=(0 1 2)
COORD=$DIR/coordinator
RUN=$COORD/run

say() { printf '\033[1m%s\033[0m\n' "$*"; }
show() {  # show PARTY COMMAND...: the command as it can be pasted into a shell
  local text
  printf -v text '%q ' "${@:2}"
  printf '%s$ %s\n' "$1" "${text% }"
}

# fail MESSAGE [LOG]: the message, the end of the log that shows why, exit 1 (cleanup runs)
fail() {
  echo "deploy_demo: error: $1" >&2
  if [ -n "${2:-}" ] && [ -f "$2" ]; then
    echo "--- the last lines of $2:" >&2
    tail -n 40 "$2" >&2
    echo "---" >&2
  fi
  exit 1
}

[ -x "$FEDIT" ] || fail "$FEDIT not found: run 'bash scripts/setup.sh' first (or set FEDIT_VENV)"
[ ! -e "$DIR" ] || fail "$DIR exists (an earlier demo?): remove it, or pass --dir NEW_DIR"
[ -f "$DOLLY" ] || fail "$DOLLY not found: pass --dolly databricks-dolly-15k.jsonl"

# ---- the parties' processes: started in the background, stopped on any exit ----

declare -A PIDS=()  # party name -> pid
LOGS=()             # every log written, for the summary

start() {  # start NAME LOG COMMAND...: print the command, run it in the background
  local name=$1 log=$2
  shift 2
  show "$name" "$@"
  "$@" >"$log" 2>&1 &
  PIDS[$name]=$!
}

stop_all() {  # SIGTERM: fedit stops its Flower children (within ~10 s) and exits
  local name
  for name in "${!PIDS[@]}"; do kill -TERM "${PIDS[$name]}" 2>/dev/null || true; done
  # once more after 15 s: Python drops the exception a signal handler raises while it
  # finalises an object (seen: a SIGTERM during `fedit join`'s model load); SIGKILL at 40 s
  wait_for_exit 15
  for name in "${!PIDS[@]}"; do
    if kill -0 "${PIDS[$name]}" 2>/dev/null; then kill -TERM "${PIDS[$name]}" 2>/dev/null || true; fi
  done
  wait_for_exit 25
  for name in "${!PIDS[@]}"; do
    if kill -0 "${PIDS[$name]}" 2>/dev/null; then
      echo "deploy_demo: $name did not stop in 40 s: killed (a Flower child of it may be left)" >&2
      kill -KILL "${PIDS[$name]}" 2>/dev/null || true
    fi
    wait "${PIDS[$name]}" 2>/dev/null || true
    unset "PIDS[$name]"
  done
}

wait_for_exit() {  # wait_for_exit SECONDS: until every party has ended, or SECONDS passed
  local name deadline=$((SECONDS + $1))
  for name in "${!PIDS[@]}"; do
    while kill -0 "${PIDS[$name]}" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  done
}

on_exit() {
  local status=$?
  trap - EXIT
  trap '' INT TERM  # the cleanup is not cut short
  if [ ${#PIDS[@]} -gt 0 ]; then
    echo "deploy_demo: stopping ${!PIDS[*]} (up to 40 s)" >&2
    stop_all
  fi
  exit $status
}
trap on_exit EXIT
trap 'echo "deploy_demo: interrupted" >&2; exit 130' INT TERM

reap() {  # reap NAME: STATUS = the exit status of a party that has ended
  STATUS=0
  wait "${PIDS[$1]}" || STATUS=$?
  unset "PIDS[$1]"
}

# ---- the files each party holds ----

mkdir -p "$COORD/nodes"
SETUP_LOG=$DIR/setup.log
say "coordinator: a CA and the TLS certificate of the fleet front (127.0.0.1)"
"$FEDIT" certs ca --out "$COORD/pki" --server-name localhost --ip 127.0.0.1 >>"$SETUP_LOG" 2>&1 ||
  fail "fedit certs ca failed" "$SETUP_LOG"
for k in "${OWNERS[@]}"; do
  owner=$DIR/owner_$k
  mkdir -p "$owner"
  "$FEDIT" certs node-key --out "$owner/node.key" >>"$SETUP_LOG" 2>&1 ||
    fail "fedit certs node-key failed" "$SETUP_LOG"
  cp "$owner/node.pub" "$COORD/nodes/owner_$k.pub"  # the only file an owner sends
  cp "$COORD/pki/ca.pem" "$owner/ca.pem"            # the only file an owner receives
done
say "owner_0..2: node keys; node.pub copied to the coordinator, ca.pem to each owner"

# Dolly's categories sorted into 6 shards, two per owner (non-IID, the FedIT paper's split),
# 600 records in all, 3 a category held out for the coordinator.
"$FEDIT" partition --out "$DIR/partition" --set "data.path=$DOLLY" \
  --set partition.num_clients=3 --set data.max_records=600 --set data.heldout_per_category=3 \
  >>"$SETUP_LOG" 2>&1 || fail "fedit partition of $DOLLY failed" "$SETUP_LOG"
for k in "${OWNERS[@]}"; do mv "$DIR/partition/client_$k.jsonl" "$DIR/owner_$k/data.jsonl"; done
mv "$DIR/partition/heldout.jsonl" "$COORD/heldout.jsonl"
say "each owner's records (owner = client), from $DOLLY:"
cat "$DIR/partition/partition_table.txt"

# ---- the commands ----

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SERVER=127.0.0.1:$PORT
SETS=(--set "deploy.fleet_address=$SERVER")  # not TOML: taken as a string
if [ "$DIR" != "$DEFAULT_DIR" ]; then  # the config names the default dir's files
  SETS+=(
    --set "output_dir=$RUN"
    --set "data.path=$DIR/owner_*/data.jsonl"
    --set "data.heldout_path=$COORD/heldout.jsonl"
    --set "deploy.certs_dir=$COORD/pki"
    --set "deploy.clients=[\"$COORD/nodes/owner_0.pub\", \"$COORD/nodes/owner_1.pub\", \"$COORD/nodes/owner_2.pub\"]"
  )
fi
COORDINATE=("$FEDIT" coordinate -c "$CONFIG" --quiet "${SETS[@]}")
join_command() {  # join_command K: owner K's command (three owners share 2 cores: 1 thread)
  local owner=$DIR/owner_$1
  JOIN=("$FEDIT" join --server "$SERVER" --data "$owner/data.jsonl" --root-cert "$owner/ca.pem"
    --key "$owner/node.key" --state-dir "$owner/state" --threads 1)
}

if [ $SETUP_ONLY = 1 ]; then
  say "set up in $DIR; the parties would run:"
  show coordinator "${COORDINATE[@]}"
  for k in "${OWNERS[@]}"; do join_command "$k" && show "owner_$k" "${JOIN[@]}"; done
  exit 0
fi

# ---- the federation ----

STARTED=$SECONDS
COORD_LOG=$COORD/coordinator.log
start coordinator "$COORD_LOG" "${COORDINATE[@]}"
LOGS+=("$COORD_LOG")
# the owners could start first (they wait for the coordinator); starting them once the
# fleet front is up keeps a failing coordinator's message first
while ! grep -q "fleet front on" "$COORD_LOG"; do
  if ! kill -0 "${PIDS[coordinator]}" 2>/dev/null; then
    reap coordinator
    fail "the coordinator exited (code $STATUS) before its fleet front was up" "$COORD_LOG"
  fi
  [ $((SECONDS - STARTED)) -lt 600 ] || fail "no fleet front after 600 s" "$COORD_LOG"
  sleep 1
done
say "coordinator: fleet front on $SERVER (the only port the owners reach)"
for k in "${OWNERS[@]}"; do
  join_command "$k"
  start "owner_$k" "$DIR/owner_$k/join.log" "${JOIN[@]}"
  LOGS+=("$DIR/owner_$k/join.log")
done

shown=0  # the coordinator's round lines, shown as they come
while kill -0 "${PIDS[coordinator]}" 2>/dev/null; do
  for k in "${OWNERS[@]}"; do
    if ! kill -0 "${PIDS[owner_$k]}" 2>/dev/null; then
      reap "owner_$k"
      fail "owner_$k exited (code $STATUS) before the run finished" "$DIR/owner_$k/join.log"
    fi
  done
  lines=$(grep -E '^round [0-9]+:' "$COORD_LOG" || true)
  count=$(printf '%s' "$lines" | grep -c . || true)
  if [ "$count" -gt $shown ]; then
    printf '%s\n' "$lines" | tail -n $((count - shown)) | sed 's/^/coordinator: /'
    shown=$count
  fi
  sleep 2
done
reap coordinator
[ $STATUS = 0 ] || fail "the coordinator failed (code $STATUS)" "$COORD_LOG"
{ grep -E '^round [0-9]+:' "$COORD_LOG" || true; } | tail -n +$((shown + 1)) | sed 's/^/coordinator: /'
say "the run is done after $((SECONDS - STARTED)) s; stopping the owners"
stop_all

# ---- where everything is ----

"$PY" - "$RUN" <<'EOF'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
for line in lines:
    text = f"round {line['round']}:"
    if "heldout" in line:
        text += f" held-out loss {line['heldout']['overall']['loss']:.4f}"
    if line["round"] == 0:
        text += " (the base model)"
    for client in line.get("clients", []):
        text += (
            f" | owner_{client['id']} {client['bytes_down'] / 1e6:.2f} MB down"
            f" {client['bytes_up'] / 1e6:.2f} MB up"
        )
    print(text)
last = max(run.glob("round_[0-9][0-9][0-9][0-9]"))
print(f"final adapter: {last}/adapter_model.safetensors (PEFT layout, {last}/adapter_config.json)")
print(f"metrics:       {run / 'metrics.jsonl'}")
EOF
echo "logs:          ${LOGS[*]}"
