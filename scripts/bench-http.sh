#!/usr/bin/env bash
# Measures the records API with wrk against a release build on loopback:
# GET of one record by id, and POST of new records. Installs wrk (Debian) when missing.
# Usage: scripts/bench-http.sh [DURATION_SECONDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10}"
connections="${2:-64}"

if ! command -v wrk >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
cargo build --release -q

data=$(mktemp -d)
out="$data/stdout"
./target/release/duplex serve --http 127.0.0.1:0 --tcp 127.0.0.1:0 --data "$data" \
  >"$out" 2>"$data/stderr" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do grep -q 'http://' "$out" 2>/dev/null && break; sleep 0.1; done
url=$(grep -o 'http://[0-9.:]*' "$out" | head -n1)

id=$(curl -sf "$url/api/collections/bench/records" -H 'content-type: application/json' \
  -d '{"title":"a benchmark record","author":"ana","tags":["x","y"],"stars":5}' |
  sed 's/.*"id":"\([^"]*\)".*/\1/')

cat >"$data/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"title":"a benchmark record","author":"ana","tags":["x","y"],"stars":5}'
LUA

echo "== GET $url/api/collections/bench/records/$id (${duration}s, $connections connections)"
wrk -t2 -c"$connections" -d"${duration}s" --latency "$url/api/collections/bench/records/$id"
echo "== POST $url/api/collections/bench/records (${duration}s, $connections connections)"
wrk -t2 -c"$connections" -d"${duration}s" --latency -s "$data/post.lua" \
  "$url/api/collections/bench/records"
echo "== server RSS: $(grep VmRSS /proc/$pid/status)"
