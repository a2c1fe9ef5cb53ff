#!/usr/bin/env bash
# Takes the screenshots in docs/ again, from the real pages: the console's and the example
# applications' browser tests, with DUPLEX_SCREENSHOTS pointing at docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-browser.sh
export DUPLEX_TEST_BROWSER=1 DUPLEX_SCREENSHOTS="$PWD/docs"
cargo test -p duplex-server --test console --test examples
