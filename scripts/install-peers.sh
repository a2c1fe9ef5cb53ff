#!/usr/bin/env bash
# Installs the peer servers `duplex bench --peer` and `duplex bench compare` measure beside
# duplex: Debian's nodejs and npm, then Node `ws` and Socket.IO from bench/peers' committed
# lockfile (`npm ci`). Idempotent; prints what it did.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "install-peers: installing Debian's nodejs and npm"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
# Again whenever the lockfile changed since the last install.
lock=bench/peers/package-lock.json
installed=bench/peers/node_modules/.package-lock.json
if [ ! -f "$installed" ] || [ "$lock" -nt "$installed" ]; then
  echo "install-peers: npm ci in bench/peers"
  (cd bench/peers && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "install-peers: node $(node --version), ws $(node -p "require('./bench/peers/node_modules/ws/package.json').version"), socket.io $(node -p "require('./bench/peers/node_modules/socket.io/package.json').version")"
