#!/usr/bin/env bash
# protoc, which candle-onnx's build script runs (prost-build) to compile the ONNX protobuf schema.
# Uses the one on PATH if there is one; otherwise unpacks Debian's protobuf-compiler and its two
# libraries into the cache (no root, no system change) behind a wrapper that finds them.
# Idempotent; progress goes to stderr, the protoc path to stdout:
#   export PROTOC="$(scripts/setup_protoc.sh)"
set -euo pipefail

if command -v protoc >/dev/null; then
  command -v protoc
  exit 0
fi

dir="${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}/tools/protoc"
packages=(protobuf-compiler libprotoc32 libprotobuf32)
if [[ ! -x "$dir/bin/protoc" ]] || ! "$dir/bin/protoc" --version >/dev/null 2>&1; then
  command -v apt-get >/dev/null || {
    echo "setup_protoc: protoc is not installed and apt-get is missing; install protobuf-compiler" >&2
    exit 1
  }
  echo "setup_protoc: unpacking ${packages[*]} into $dir" >&2
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download -q "${packages[@]}" >&2)
  rm -rf "$dir"
  mkdir -p "$dir/bin"
  for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$dir/root"
  done
  cat >"$dir/bin/protoc" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$dir/root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$dir/root/usr/bin/protoc" "\$@"
EOF
  chmod 0755 "$dir/bin/protoc"
  "$dir/bin/protoc" --version >&2
fi
echo "$dir/bin/protoc"
