#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (the continuous-batching peer for Ember's LLM benchmarks)
# from the llama.cpp sources vendored in the llama-cpp-python 0.3.36 sdist.
#
# Usage:
#   LLAMA_SERVER=$(loadtest/peers/build_llama_server.sh)
#   "$LLAMA_SERVER" -m model.gguf -t 2 -tb 2 -c 8192 -np 16 -cb --host 127.0.0.1 --port 18199
#
# The only thing written to stdout is the absolute path of the llama-server binary; every log line
# (pip, tar, apt-get, cmake, compiler) goes to stderr.
#
# Idempotent: if the binary already exists and `llama-server --version` runs, nothing is done.
# Each step is also skipped on its own when its output is already there (sdist, unpacked source).
#
# Environment:
#   EMBER_CACHE_DIR    cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/ember)
#   EMBER_BUILD_JOBS   parallel compile jobs (default 2; the build machines have 2 cores)
#
# Notes on the vendored llama.cpp (commit 0c1e570, shipped with llama-cpp-python 0.3.36):
#   - Its submodule git metadata is a shallow clone, so `--version` reports build number 1
#     ("version: 0.5.0-dev (build 1, commit 0c1e570)"); the commit hash is the meaningful part.
#   - LLAMA_CURL is deprecated in this version and ignored (it would only warn if set ON); it is
#     still passed so the same command also works on older llama.cpp trees. Model download over
#     HTTPS (not needed here) goes through LLAMA_OPENSSL instead, which finds Debian's libssl-dev
#     when installed and is simply left out when it is not.
#   - With LLAMA_BUILD_UI=OFF and LLAMA_USE_PREBUILT_UI=OFF the server is built without the
#     embedded web UI (cmake warns "UI: no assets available"); no npm and no download at build time.
#   - GGML_NATIVE=ON tunes for this CPU: the binary is not portable to other machines.
#   - llama-batched-bench is built too (same build tree, next to llama-server) for offline
#     batched-decoding throughput numbers.
set -euo pipefail

# Keep stdout for the final path only; send everything else to stderr.
exec 3>&1 1>&2

SDIST_VERSION=0.3.36
JOBS="${EMBER_BUILD_JOBS:-2}"
CACHE="${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}"
SDIST_DIR="$CACHE/sdist"
SDIST="$SDIST_DIR/llama_cpp_python-${SDIST_VERSION}.tar.gz"
SRC="$CACHE/llama-server-src"
LLAMA_DIR="$SRC/vendor/llama.cpp"
BIN="$LLAMA_DIR/build/bin/llama-server"

log() { printf '[build_llama_server] %s\n' "$*"; }

# 0. Already built? Then do nothing.
if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
    log "already built: $BIN"
    echo "$BIN" >&3
    exit 0
fi

# 1. Toolchain: Debian cmake, a C++ compiler and make (cmake's default generator).
need_pkgs=()
command -v cmake >/dev/null 2>&1 || need_pkgs+=(cmake)
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1; then
    need_pkgs+=(g++)
fi
command -v make >/dev/null 2>&1 || need_pkgs+=(make)
if ((${#need_pkgs[@]})); then
    log "installing missing build tools: ${need_pkgs[*]}"
    SUDO=()
    if [[ "$(id -u)" -ne 0 ]]; then
        SUDO=(sudo)
    fi
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${need_pkgs[@]}"
fi
log "using $(cmake --version | head -n1), $( (c++ --version 2>/dev/null || g++ --version) | head -n1)"

# 2. The sdist (source only: --no-binary for this one package, not :all:).
if [[ ! -f "$SDIST" ]]; then
    log "downloading llama-cpp-python==${SDIST_VERSION} sdist into $SDIST_DIR"
    mkdir -p "$SDIST_DIR"
    python3 -m pip download --no-deps --no-binary llama-cpp-python \
        --dest "$SDIST_DIR" "llama-cpp-python==${SDIST_VERSION}"
fi
[[ -f "$SDIST" ]] || { log "error: $SDIST not found after pip download"; exit 1; }

# 3. Unpack (into a temp dir first so an interrupted untar never looks complete).
#    The sdist keeps the llama.cpp submodule's git dir (.git/modules/vendor/llama.cpp), so
#    cmake's build-info can still read the commit hash.
if [[ ! -f "$LLAMA_DIR/CMakeLists.txt" ]]; then
    log "unpacking $SDIST into $SRC"
    mkdir -p "$CACHE"
    tmp="$(mktemp -d "$CACHE/llama-server-src.tmp.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    tar -xzf "$SDIST" -C "$tmp" --strip-components=1
    rm -rf "$SRC"
    mv "$tmp" "$SRC"
    trap - EXIT
fi

# 4. Configure and build only the targets we need.
cd "$LLAMA_DIR"
log "configuring in $LLAMA_DIR/build"
cmake -B build \
    -DLLAMA_BUILD_SERVER=ON \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DCMAKE_BUILD_TYPE=Release
log "building llama-server and llama-batched-bench with -j$JOBS"
start=$SECONDS
cmake --build build -j"$JOBS" --target llama-server llama-batched-bench
log "build took $((SECONDS - start)) s"

if [[ ! -x "$BIN" ]]; then
    log "error: $BIN was not produced"
    exit 1
fi
"$BIN" --version || { log "error: $BIN --version failed"; exit 1; }
echo "$BIN" >&3
