#!/usr/bin/env bash
# Installs what the browser test needs, on a fresh machine: Debian's Chromium and
# playwright-core (to drive it) under tests/browser/node_modules. Idempotent; prints what it did.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  echo "install-browser: installing Debian's chromium"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if ! command -v node >/dev/null 2>&1; then
  echo "install-browser: installing Debian's nodejs and npm"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  echo "install-browser: npm ci in tests/browser"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "install-browser: $(chromium --version 2>/dev/null | head -n1), node $(node --version)"
