#!/bin/sh
# The images' HEALTHCHECK (ember has no probe subcommand): GET /health/live on the port of
# EMBER_ADDR, over https when EMBER_TLS_CERT is set (-k: the certificate names the service, not
# 127.0.0.1; this checks that the process answers, not who it is). Liveness, not readiness: models
# load after the port opens and may take a while. Docker reads exit codes other than 0 and 1 as
# something else, hence `|| exit 1`.
scheme=http
[ -z "${EMBER_TLS_CERT:-}" ] || scheme=https
port="${EMBER_ADDR##*:}"
url="$scheme://127.0.0.1:${port:-8080}/health/live"
curl -fsSk --max-time 2 -o /dev/null "$url" || exit 1
