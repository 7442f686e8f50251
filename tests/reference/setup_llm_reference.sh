#!/usr/bin/env bash
# Creates the Python venv used to regenerate the SmolLM2 llama.cpp reference
# fixtures (tests/reference/make_llm_fixtures.py): llama-cpp-python (which
# builds llama.cpp from source with cmake; ~10 minutes on 2 cores), jinja2 and
# gguf. Idempotent: a venv that already imports the pinned versions is left
# alone. Prints the venv's python path on its last line.
#
#   tests/reference/setup_llm_reference.sh
#   "$(tests/reference/setup_llm_reference.sh | tail -n1)" \
#       tests/reference/make_llm_fixtures.py \
#       --gguf models/SmolLM2-135M-Instruct/weights/SmolLM2-135M-Instruct.Q4_1.gguf
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
JINJA2_VERSION=3.1.6
GGUF_VERSION=0.19.0

cache="${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}"
venv="$cache/llm-ref-venv"
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

if venv_ok; then
  log "venv at $venv already has llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION, jinja2 and gguf"
  echo "$py"
  exit 0
fi

# llama-cpp-python ships only an sdist: a C/C++ toolchain and cmake are needed.
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
{ command -v gcc >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 && command -v make >/dev/null 2>&1; } \
  || missing+=(build-essential)
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
  else
    sudo apt-get update
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
  fi
fi

mkdir -p "$cache"
if [[ ! -x "$py" ]]; then
  log "creating venv at $venv"
  "$base_python" -m venv "$venv"
fi
"$py" -m pip install --quiet --upgrade pip

# Two build jobs at most (the machine has 2 cores).
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
log "installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (builds llama.cpp from source; ~10 min on 2 cores)"
"$py" -m pip install --no-cache-dir --verbose \
  "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" \
  "jinja2==$JINJA2_VERSION" \
  "gguf==$GGUF_VERSION" >"$venv/pip-install.log" 2>&1 || {
    log "pip install failed; last lines of $venv/pip-install.log:"
    tail -n 60 "$venv/pip-install.log" >&2
    exit 1
  }

venv_ok || { log "venv at $venv does not import the pinned packages"; exit 1; }
log "done"
echo "$py"
