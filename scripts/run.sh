#!/usr/bin/env bash
# Fetches the demo models if they are missing, builds Ember and serves the model repository.
#   scripts/run.sh                      serve models/ on 127.0.0.1:8080
#   EMBER_ADDR=0.0.0.0:8080 scripts/run.sh
# Any arguments go to `ember serve` (see `ember serve --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
models/fetch.sh
PROTOC="$(scripts/setup_protoc.sh)"
export PROTOC
cargo build --release --locked --bin ember
exec target/release/ember serve --models "${EMBER_MODELS:-models}" "$@"
