#!/usr/bin/env bash
# The CUDA compiler and headers that candle's `cuda` feature needs at build time (nvcc compiles
# candle's kernels; no GPU is needed), from NVIDIA's PyPI packages, into a venv under the cache.
# Idempotent; prints the toolkit root (bin/nvcc, include/) on stdout. CUDA 13.2: the newest
# release cudarc 0.19 (candle 0.11's CUDA bindings) knows, and one whose five packages all exist
# at the same version. The CUDA image (docker/Dockerfile.cuda) builds the same feature set on
# NVIDIA's own CUDA 12.4 devel image instead.
set -euo pipefail
venv="${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}/cuda-venv"
version=13.2.86
want=(nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl nvidia-cuda-crt nvidia-nvvm)
check="import sys
from importlib.metadata import version
sys.exit(not all(version(p) == '$version' for p in '${want[*]}'.split()))"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "$check" 2>/dev/null; then
  echo "setup_cuda_toolchain: preparing $venv with CUDA $version (about 330 MB)" >&2
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${want[@]/%/==$version}" >&2
fi
root="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
[[ -x "$root/bin/nvcc" ]] || { echo "setup_cuda_toolchain: no nvcc under $root" >&2; exit 1; }
echo "$root"
