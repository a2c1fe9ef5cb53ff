#!/usr/bin/env bash
# Fuzzes the server's decoders and parsers with cargo-fuzz (libFuzzer, the nightly toolchain):
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
#
# runs each target (all of them by default) for SECONDS (default 30; 600 is the long run of
# docs/reliability.md), starting from the committed seeds (fuzz/seeds/TARGET) and the corpus
# earlier runs grew (fuzz/corpus/TARGET, not committed). A crash, a timeout (10 s for one input)
# or a memory blow-up (over 2 GiB) stops the run with the input in fuzz/artifacts/TARGET; make
# it a regular test next to the code it broke. Installs cargo-fuzz from crates.io when missing.
#
# Built with debug assertions (integer overflow panics) and without a sanitizer: the crates
# fuzzed forbid `unsafe`, so AddressSanitizer would only slow the search down.
set -euo pipefail

seconds="${1:-30}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(client_frame binary_frame tcp_frames websocket_frames records_query merge_patch)
fi

cd "$(dirname "$0")/../fuzz"

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: needs the nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! command -v cargo-fuzz > /dev/null; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

# FUZZ_PROFILE=dev builds without optimisation: a third of the build time and a slower search,
# for a short run that only checks the targets build and start.
if [ "${FUZZ_PROFILE:-release}" = dev ]; then
    flags=(--sanitizer none --dev)
else
    flags=(--sanitizer none --release --debug-assertions)
fi
cargo +nightly fuzz build "${flags[@]}"

for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    log="$(mktemp)"
    if ! cargo +nightly fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 > "$log" 2>&1; then
        tail -n 60 "$log"
        echo "fuzz: $target FAILED (the input is in fuzz/artifacts/$target)" >&2
        exit 1
    fi
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
    peak="$(grep -o 'stat::peak_rss_mb: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || echo '?')"
    inputs="$(find "corpus/$target" -type f | wc -l)"
    echo "fuzz: $target ok: ${seconds}s, $runs inputs run, coverage $cov, corpus $inputs, peak RSS ${peak} MB"
    rm -f "$log"
done
