#!/usr/bin/env bash
# Measures the records API with wrk against a release build on loopback, beside a bare axum
# route that answers a typed JSON body of the record's size (`duplex bench baseline-server`):
# GET one record by id, the first page of 20 and the second, POST a new record, PATCH one record
# (If-Match: *, so every request takes the conditional write path without retries). Installs wrk
# (Debian) when missing.
#
# Usage: scripts/bench-http.sh [DURATION_SECONDS] [CONNECTIONS] [DUPLEX_BINARY]
# The binary defaults to this checkout's release build (built first); pass another one to
# compare builds on the same machine. wrk runs one thread, so on a 2-core machine it and the
# server each have about a core.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-8}"
connections="${2:-64}"
duplex="${3:-}"

if ! command -v wrk >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
if [ -z "$duplex" ]; then
  cargo build --release -q -p duplex
  duplex=./target/release/duplex
fi

data=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$data"
}
trap cleanup EXIT

# Starts a process that prints its address to $data/$1.out.
start() {
  local name=$1
  shift
  "$@" >"$data/$name.out" 2>"$data/$name.err" &
  pids+=($!)
}

# Prints the address the process named $1 printed, once it did.
address() {
  for _ in $(seq 1 100); do grep -q 'http://' "$data/$1.out" 2>/dev/null && break; sleep 0.1; done
  grep -o 'http://[0-9.:]*' "$data/$1.out" | head -n1
}

start duplex "$duplex" serve --http 127.0.0.1:0 --tcp 127.0.0.1:0 --data "$data/db"
server_pid=${pids[0]}
url=$(address duplex)
records="$url/api/collections/bench/records"
body='{"title":"a benchmark record","author":"ana","tags":["x","y"],"stars":5}'
for _ in $(seq 1 40); do
  curl -sf "$records" -H 'content-type: application/json' -d "$body" >/dev/null
done
created=$(curl -sf "$records" -H 'content-type: application/json' -d "$body")
id=$(echo "$created" | sed 's/.*"id":"\([^"]*\)".*/\1/')
size=$(curl -sf "$records/$id" | wc -c)
# The second page of 20: read from SQLite every time (the first page is served from memory until
# the collection is written).
cursor=$(curl -sf "$records?limit=20" | sed 's/.*"next":"\([^"]*\)".*/\1/')

baseline=""
if "$duplex" bench baseline-server --help >/dev/null 2>&1; then
  start baseline "$duplex" bench baseline-server --size "$size"
  baseline=$(address baseline)
fi

cat >"$data/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '$body'
LUA
cat >"$data/patch.lua" <<'LUA'
wrk.method = "PATCH"
wrk.headers["Content-Type"] = "application/merge-patch+json"
wrk.headers["If-Match"] = "*"
wrk.body = '{"stars":4}'
LUA

# One wrk run: prints "name req/s p50 p99".
run() {
  local name=$1
  shift
  local out
  out=$(wrk -t1 -c"$connections" -d"${duration}s" --latency "$@")
  local rate p50 p99
  rate=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  # Answers that were not 2xx (or sockets that failed) make a rate that measured errors, not
  # the operation: say so on the row and fail the script at the end.
  local failed=""
  if echo "$out" | grep -qE 'Non-2xx|Socket errors'; then
    echo "$out" | grep -E 'Non-2xx|Socket errors' >&2
    failed="  FAILED: not every answer was 2xx"
    failures=$((failures + 1))
  fi
  printf '%-10s %10s %9s %9s%s\n' "$name" "$rate" "$p50" "$p99" "$failed"
}
failures=0

echo "duplex: $duplex; a ${size}-byte record; wrk -t1 -c$connections -d${duration}s"
printf '%-10s %10s %9s %9s\n' what req/s p50 p99
if [ -n "$baseline" ]; then run baseline "$baseline/record"; fi
run get "$records/$id"
run list "$records?limit=20"
run list-next "$records?limit=20&cursor=$cursor"
run post -s "$data/post.lua" "$records"
run patch -s "$data/patch.lua" "$records/$id"
echo "server RSS: $(awk '/VmRSS/ {print $2, $3}' "/proc/$server_pid/status")"
if [ "$failures" -gt 0 ]; then
  echo "$failures run(s) had answers that were not 2xx: their figures are not the operation's" >&2
  exit 1
fi
