#!/usr/bin/env bash
# Creates the Python venv used to regenerate the SmolLM2 llama.cpp reference
# fixtures (tests/reference/make_llm_fixtures.py): llama-cpp-python (an sdist
# only: it builds llama.cpp from source with cmake, ~10 minutes on 2 cores),
# jinja2 and gguf. Idempotent: a venv that already imports the pinned versions
# is left alone. Writes the vendored llama.cpp commit (read from the sdist's git
# metadata) to <venv>/llama_cpp_commit.txt. Prints the venv's python path on
# its last line (and only that on stdout; progress goes to stderr).
#
#   PY="$(tests/reference/setup_llm_reference.sh)"
#   "$PY" tests/reference/make_llm_fixtures.py \
#       --gguf models/SmolLM2-135M-Instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
JINJA2_VERSION=3.1.6
GGUF_VERSION=0.19.0

cache="${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}"
venv="$cache/llm-ref-venv"
sdist_dir="$cache/sdist"
py="$venv/bin/python"
base_python="${PYTHON:-python3}"

log() { echo "setup_llm_reference: $*" >&2; }

venv_ok() {
  [[ -x "$py" ]] || return 1
  "$py" - "$LLAMA_CPP_PYTHON_VERSION" <<'PY' >/dev/null 2>&1
import sys
import llama_cpp, jinja2, gguf  # noqa: F401
sys.exit(0 if llama_cpp.__version__ == sys.argv[1] else 1)
PY
}

sdist_path() { compgen -G "$sdist_dir/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" | head -n1; }

fetch_sdist() {
  if [[ -z "$(sdist_path)" ]]; then
    mkdir -p "$sdist_dir"
    log "downloading the llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
    "$base_python" -m pip download --quiet --no-deps --no-binary :all: --dest "$sdist_dir" \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
  fi
  sdist_path
}

record_commit() { # the vendored llama.cpp commit, from the sdist's .git/modules
  [[ -s "$venv/llama_cpp_commit.txt" ]] && return 0
  local sdist
  sdist=$(fetch_sdist)
  "$base_python" - "$sdist" >"$venv/llama_cpp_commit.txt" <<'PY' || rm -f "$venv/llama_cpp_commit.txt"
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    for m in t.getmembers():
        if m.name.endswith(".git/modules/vendor/llama.cpp/HEAD"):
            print(t.extractfile(m).read().decode().strip())
            break
    else:
        sys.exit(1)
PY
  [[ -s "$venv/llama_cpp_commit.txt" ]] && log "llama.cpp commit: $(cat "$venv/llama_cpp_commit.txt")" \
    || log "could not read the llama.cpp commit from the sdist"
}

if venv_ok; then
  log "venv at $venv already has llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION, jinja2 and gguf"
  record_commit || true
  echo "$py"
  exit 0
fi

# Building llama.cpp needs a C/C++ toolchain and cmake.
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
{ command -v gcc >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 && command -v make >/dev/null 2>&1; } \
  || missing+=(build-essential)
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update >&2
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2
fi

mkdir -p "$cache"
if [[ ! -x "$py" ]]; then
  log "creating venv at $venv"
  "$base_python" -m venv "$venv"
fi
"$py" -m pip install --quiet --upgrade pip >&2

sdist=$(fetch_sdist)
# Two build jobs at most (the machine has 2 cores).
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
log "installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION from $sdist (builds llama.cpp; ~10 min on 2 cores)"
log "build log: $venv/pip-install.log"
"$py" -m pip install --no-cache-dir --verbose \
  "$sdist" \
  "jinja2==$JINJA2_VERSION" \
  "gguf==$GGUF_VERSION" >"$venv/pip-install.log" 2>&1 || {
    log "pip install failed; last lines of $venv/pip-install.log:"
    tail -n 60 "$venv/pip-install.log" >&2
    exit 1
  }

venv_ok || { log "venv at $venv does not import the pinned packages"; exit 1; }
record_commit || true
log "done"
echo "$py"
