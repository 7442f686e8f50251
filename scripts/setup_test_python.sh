#!/usr/bin/env bash
# A Python environment for the tests that drive Ember with third-party clients (the `openai`
# library). Idempotent; prints the interpreter's path on stdout.
set -euo pipefail
venv="${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}/test-venv"
want="openai==3.54.0"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import openai, sys; sys.exit(openai.__version__ != "3.54.0")' 2>/dev/null; then
  echo "setup_test_python: creating $venv with $want" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$want" >&2
fi
echo "$venv/bin/python"
