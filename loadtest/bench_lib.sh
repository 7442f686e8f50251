# Shared by the bench_*.sh scripts (sourced, not run): start a server on loopback and wait for
# readiness. Logs go to "$out" (each script's scratch folder).

start() { # repo dir, port; sets $server to the pid
  target/release/ember serve --models "$1" --addr "127.0.0.1:$2" >"$out/serve-$2.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$2/health/ready" >/dev/null && return
    sleep 0.1
  done
  echo "ember did not start; see $out/serve-$2.log" >&2
  exit 1
}
