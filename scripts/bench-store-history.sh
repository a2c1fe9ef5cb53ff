#!/usr/bin/env bash
# Publications over HTTP into channel history kept in the store (`history_storage = "store"`),
# answered after their append commits: a server on a fresh PostgreSQL schema (or on SQLite with
# `sqlite`), four `bench:` channels of `history_size = 100`, then PUBLICATIONS from one
# keep-alive client and from eight at once (Python's http.client, standard library only).
#
# Usage: scripts/bench-store-history.sh [STORE] [PUBLICATIONS] [DUPLEX_BINARY]
#   STORE: a postgres:// URL (default: $DUPLEX_TEST_POSTGRES or the local test database), or sqlite
#   KEYED=1 in the environment: each publication carries its own `Idempotency-Key`
set -euo pipefail
cd "$(dirname "$0")/.."
store="${1:-${DUPLEX_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}}"
count="${2:-1500}"
duplex="${3:-}"
if [ -z "$duplex" ]; then
  cargo build --release -q -p duplex
  duplex=./target/release/duplex
fi

work=$(mktemp -d)
schema="bench_history_$$_$(date +%s)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2> /dev/null || true; wait "$pid" 2> /dev/null || true; fi
  if [ "$store" != sqlite ]; then
    psql -q "$store" -c "DROP SCHEMA IF EXISTS $schema CASCADE" > /dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

printf 'publish_rate = 100000000\npublish_burst = 100000000\n\n[namespaces.bench]\npublish = "anyone"\nhistory_storage = "store"\nhistory_size = 100\n' > "$work/duplex.toml"
args=(serve --http 127.0.0.1:0 --tcp 127.0.0.1:0 --config "$work/duplex.toml" --data "$work")
if [ "$store" != sqlite ]; then
  separator='?'
  case "$store" in *\?*) separator='&' ;; esac
  args+=(--store "${store}${separator}options[search_path]=$schema")
fi
DUPLEX_LOG=warn "$duplex" "${args[@]}" > "$work/out.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  grep -q "serving HTTP" "$work/out.log" && break
  sleep 0.1
done
address=$(grep -o 'http://127.0.0.1:[0-9]*' "$work/out.log" | head -n1)
[ -n "$address" ] || { cat "$work/out.log"; echo "the server did not start" >&2; exit 1; }
port=${address##*:}

python3 - "$port" "$count" "${KEYED:-}" << 'PY'
import http.client, json, sys, threading, time, uuid

port, count, keyed = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"

def run(publishers):
    latencies = []
    def publisher(k):
        connection = http.client.HTTPConnection("127.0.0.1", port)
        body = json.dumps({"data": {"x": "y" * 80}})
        mine = []
        for _ in range(count // publishers):
            started = time.perf_counter()
            headers = {"content-type": "application/json"}
            if keyed:
                headers["idempotency-key"] = str(uuid.uuid4())
            connection.request("POST", f"/api/channels/bench:c{k % 4}/publish", body, headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"publish answered {response.status}")
            mine.append(time.perf_counter() - started)
        latencies.extend(mine)
    started = time.perf_counter()
    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(publishers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    print(f"{publishers} publishers: {len(latencies) / elapsed:.0f} publications/s, "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms")

run(1)
run(8)
PY
