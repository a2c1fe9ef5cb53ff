#!/usr/bin/env bash
# Installs Debian's nginx for the proxy test (deploy/nginx.conf in front of a real server). The
# package's own service is not started: the test runs nginx in the foreground with its own prefix.
set -euo pipefail
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "install-nginx: installing Debian's nginx"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d 101: do not start the packaged service (it would take port 80). Keep one that
  # is already there; remove only ours.
  ours=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    ours=1
  fi
  $SUDO apt-get install -y -qq --no-install-recommends nginx >/dev/null || {
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends nginx >/dev/null
  }
  if [ -n "$ours" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi
echo "install-nginx: $(/usr/sbin/nginx -v 2>&1)"
