#!/usr/bin/env bash
# A Python environment for making the demo tensor models and their reference outputs
# (scripts/make_tensor_models.py, tests/reference/make_tensor_fixtures.py): numpy and
# scikit-learn to train, onnx to write the graphs, onnxruntime as the independent reference.
# Not needed by the tests, which read the committed models and fixtures. Idempotent; prints the
# interpreter's path on stdout:
#   "$(scripts/setup_model_tools.sh)" scripts/make_tensor_models.py
set -euo pipefail
venv="${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}/model-tools-venv"
want=("numpy==2.3.4" "scikit-learn==1.7.2" "onnx==1.19.1" "onnxruntime==1.23.2")
check='import sys
from importlib.metadata import version
want = dict(w.split("==") for w in sys.argv[1:])
sys.exit(any(version(p) != v for p, v in want.items()))'
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "$check" "${want[@]}" 2>/dev/null; then
  echo "setup_model_tools: preparing $venv with ${want[*]}" >&2
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${want[@]}" >&2
fi
echo "$venv/bin/python"
