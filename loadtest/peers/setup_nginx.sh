#!/usr/bin/env bash
# nginx (Debian package), the plain reverse-proxy baseline of the edge benchmark. Idempotent.
set -euo pipefail
if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then
  exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
$sudo apt-get update -qq
$sudo apt-get install -y -qq nginx-light
