#!/usr/bin/env bash
# A Python environment for the tests that drive Ember with third-party tools: the `openai`
# client library, and schemathesis (API fuzzing from /openapi.json). Idempotent; prints the
# interpreter's path on stdout.
set -euo pipefail
venv="${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}/test-venv"
want=("openai==3.54.0" "schemathesis==4.32.5")
check='import sys
from importlib.metadata import version
sys.exit(not (version("openai") == "3.54.0" and version("schemathesis") == "4.32.5"))'
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "$check" 2>/dev/null; then
  echo "setup_test_python: preparing $venv with ${want[*]}" >&2
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${want[@]}" >&2
fi
echo "$venv/bin/python"
