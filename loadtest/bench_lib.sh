# Shared by the bench_*.sh scripts (sourced, not run): start a server on loopback and wait for
# readiness; write a repository holding the demo generation model, or the demo embedding model
# with another batch size. Logs go to "$out" (each script's scratch folder).

smollm_repo() { # repo dir, gguf path, numerics: the demo model.toml with that path and numerics
  mkdir -p "$1/SmolLM2-135M-Instruct"
  sed "s|^path .*|path = \"$2\"|" models/SmolLM2-135M-Instruct/model.toml \
    >"$1/SmolLM2-135M-Instruct/model.toml"
  # [generate] is the file's last table.
  echo "numerics = \"$3\"" >>"$1/SmolLM2-135M-Instruct/model.toml"
}

embed_repo() { # repo dir [max_batch_size]: the demo embedding model.toml, that batch size if given
  mkdir -p "$1/all-MiniLM-L6-v2"
  sed -e "s|^path .*|path = \"$PWD/models/all-MiniLM-L6-v2/weights\"|" \
    -e "${2:+s|^max_batch_size .*|max_batch_size = $2|}" \
    models/all-MiniLM-L6-v2/model.toml >"$1/all-MiniLM-L6-v2/model.toml"
}

start() { # repo dir, port; sets $server to the pid. EMBER_BIN picks another build of ember.
  "${EMBER_BIN:-target/release/ember}" serve --models "$1" --addr "127.0.0.1:$2" >"$out/serve-$2.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$2/health/ready" >/dev/null && return
    sleep 0.1
  done
  echo "ember did not start; see $out/serve-$2.log" >&2
  exit 1
}
