#!/usr/bin/env bash
# What a `publish` hook costs: the same fan-out run (`duplex bench fanout`) against a server
# without hooks and one whose `publish` hook goes to the fastest backend there is (the bench's
# baseline server answering `{"allow":true}` on loopback), side by side. The publisher is one
# WebSocket connection, so every publication waits for its hook before the next is read.
#
# Usage: scripts/bench-hooks.sh [SUBSCRIBERS] [RATE] [DURATION] [DUPLEX_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
subscribers="${1:-100}"
rate="${2:-200}"
duration="${3:-10s}"
duplex="${4:-}"
if [ -z "$duplex" ]; then
  cargo build --release -q -p duplex
  duplex=./target/release/duplex
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Starts a process that prints its address on stdout; sets $started_pid and $started_url.
start() {
  local name=$1
  shift
  "$@" >"$work/$name.out" 2>"$work/$name.err" &
  started_pid=$!
  pids+=("$started_pid")
  for _ in $(seq 1 100); do grep -q 'http://' "$work/$name.out" 2>/dev/null && break; sleep 0.1; done
  started_url=$(grep -o 'http://[0-9.:]*' "$work/$name.out" | head -n1)
  started_tcp=$(grep -o 'raw TCP on [0-9.:]*' "$work/$name.out" | head -n1 | awk '{print $4}' || true)
}

start backend "$duplex" bench baseline-server --size 100
backend=$started_url

bench_config='publish_rate = 100000000
publish_burst = 100000000

[namespaces.bench]
publish = "anyone"
'
printf '%s' "$bench_config" >"$work/plain.toml"
printf '%s\n[hooks]\nurl = "%s/hook"\nevents = ["publish"]\n' "$bench_config" "$backend" >"$work/hooks.toml"

for kind in plain hooks; do
  mkdir -p "$work/data-$kind"
  start "server-$kind" "$duplex" serve --http 127.0.0.1:0 --tcp 127.0.0.1:0 \
    --config "$work/$kind.toml" --data "$work/data-$kind"
  echo "== $kind: $subscribers subscribers, $rate publications/s, $duration"
  args=(--server "$started_url" --pid "$started_pid" --subscribers "$subscribers" --rate "$rate" --duration "$duration")
  if [ -n "$started_tcp" ]; then args+=(--tcp-server "$started_tcp"); fi
  "$duplex" bench fanout "${args[@]}"
  kill "$started_pid"
done
