#!/usr/bin/env bash
# Offline checks of the container images and the Helm chart (no Docker engine, no cluster):
#   1. hadolint on every docker/Dockerfile*;
#   2. each image's `cargo build` builds a feature set the project builds on purpose, and one that
#      scripts/test.sh compiles and lints (`cargo clippy` with the same flags; the CUDA set with
#      the nvcc of scripts/setup_cuda_toolchain.sh);
#   3. `helm lint --strict` and `helm template` with every value set in helm/ember/ci/, and the
#      rendered manifests validated against the Kubernetes API schemas (scripts/check_manifests.py);
#   4. a self-test: broken inputs of each kind above must be refused, or the checks prove nothing.
# The tools come from scripts/setup_packaging_tools.sh (network only on its first run).
#
#   scripts/check_packaging.sh                 everything
#   scripts/check_packaging.sh --no-self-test  1-3 only
# EMBER_PACKAGING_TEST_SH=FILE checks the feature sets against FILE instead of scripts/test.sh
# (to try a change to test.sh first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The Kubernetes versions manifests are validated against: the oldest the chart supports
# (kubeVersion in Chart.yaml) and that of the kubectl the tools bring (helm renders for it).
kube_versions=(1.25.0 1.34.0)
kube_version=${kube_versions[-1]}
# The feature sets the project builds, as cargo flags: the CPU cloud image (default features),
# the lean edge image, the CUDA cloud image.
built_sets=("" "--no-default-features --features edge,tls,onnx" "--features cuda")
test_sh="${EMBER_PACKAGING_TEST_SH:-scripts/test.sh}"
self_test=1
case "${1:-}" in
  "") ;;
  --no-self-test) self_test=0 ;;
  *) echo "usage: $0 [--no-self-test]" >&2; exit 2 ;;
esac

tools="$(scripts/setup_packaging_tools.sh)"
helm="$tools/bin/helm"
hadolint="$tools/bin/hadolint"
python="$tools/venv/bin/python"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --- 1. Dockerfiles -------------------------------------------------------------------------------
lint_dockerfiles() { # FILE...
  "$hadolint" --no-color "$@"
}

# --- 2. feature sets ------------------------------------------------------------------------------
# One cargo command line's feature flags, as a name: "default", "default+cuda" (--features cuda),
# "only:edge,tls" (--no-default-features --features edge,tls). Other flags do not change ember's
# features (--workspace, --all-targets) and are skipped; the words after `--` are not cargo's.
feature_set() { # COMMAND-LINE
  local words word no_default=0 take=0 features=""
  read -ra words <<<"$1"
  for word in "${words[@]}"; do
    if ((take)); then features+="$word,"; take=0; continue; fi
    case $word in
      --no-default-features) no_default=1 ;;
      --features | -F) take=1 ;;
      --features=*) features+="${word#--features=}," ;;
      --all-features) features+="ALL," ;;
      -- | '&&' | \\ | ';') break ;;
    esac
  done
  features=$(tr ',' '\n' <<<"$features" | sed '/^$/d' | sort -u | paste -sd, -)
  if ((no_default)); then echo "only:$features"; else echo "default${features:+"+$features"}"; fi
}

# Every Dockerfile that builds ember has one `cargo build --release --locked --bin ember` line;
# its feature set must be one of built_sets, and one that TEST_SH lints.
check_feature_sets() { # TEST_SH DOCKERFILE...
  local test_sh=$1 failed=0 f line fset allowed=() linted=() s
  shift
  for s in "${built_sets[@]}"; do allowed+=("$(feature_set "cargo build $s")"); done
  while IFS= read -r line; do
    linted+=("$(feature_set "${line#*cargo clippy}")")
  done < <(grep -E '^[[:space:]]*cargo clippy' "$test_sh")
  for f in "$@"; do
    local builds
    builds=$(grep -v '^[[:space:]]*#' "$f" | grep -c 'cargo build' || true)
    if ((builds == 0)); then continue; fi
    line=$(grep -v '^[[:space:]]*#' "$f" | grep 'cargo build')
    if ((builds > 1)) || [[ $line != *"cargo build --release --locked --bin ember"* ]]; then
      echo "$f: want exactly one 'cargo build --release --locked --bin ember [FEATURES]' line" >&2
      failed=1; continue
    fi
    fset=$(feature_set "${line#*cargo build}")
    if [[ " ${allowed[*]} " != *" $fset "* ]]; then
      echo "$f: builds feature set $fset, which is none of the project's builds (${allowed[*]})" >&2
      failed=1
    elif [[ " ${linted[*]} " != *" $fset "* ]]; then
      echo "$f: builds feature set $fset, but $test_sh lints only: ${linted[*]}" >&2
      local flags=${line#*--bin ember}
      flags=${flags%%\\*}; flags=${flags%%&&*}
      echo "  add to $test_sh: cargo clippy --release$flags--locked -- -D warnings" >&2
      failed=1
    else
      echo "  $f: $fset, linted by $test_sh"
    fi
  done
  return "$failed"
}

# --- 3. the chart ---------------------------------------------------------------------------------
# Lints and renders CHART with ci/NAME-values.yaml, then validates what it rendered.
check_chart() { # CHART NAME
  local chart=$1 name=$2 values="$1/ci/$2-values.yaml" release=ember-cloud
  [[ $name == edge* ]] && release=ember-edge
  "$helm" lint --strict --quiet "$chart" -f "$values" >"$work/lint.out" 2>&1 \
    || { cat "$work/lint.out" >&2; return 1; }
  # (Called where `set -e` does not apply: each step returns on failure itself.)
  "$helm" template "$release" "$chart" -f "$values" --namespace inference \
    --kube-version "$kube_version" >"$work/$name.yaml" || return 1
  "$python" scripts/check_manifests.py "${kube_versions[@]/#/--kube-version=}" --values-set "$name" \
    "$work/$name.yaml"
}

failed=0
step() { echo "== $*"; }

step "hadolint: docker/Dockerfile*"
if lint_dockerfiles docker/Dockerfile*; then echo "  clean:" docker/Dockerfile*; else failed=1; fi

step "feature sets the images build vs what $test_sh lints"
check_feature_sets "$test_sh" docker/Dockerfile* || failed=1

step "helm lint --strict, helm template, Kubernetes ${kube_versions[*]} schemas: helm/ember/ci/*-values.yaml"
for values in helm/ember/ci/*-values.yaml; do
  name=$(basename "$values" -values.yaml)
  check_chart helm/ember "$name" 2>&1 || failed=1
done

# --- 4. self-test ---------------------------------------------------------------------------------
# Runs a command that must fail, with WANT in its output (so it failed for the intended reason).
refuses() { # WHAT WANT COMMAND...
  local what=$1 want=$2 out
  shift 2
  if out=$("$@" 2>&1); then
    echo "SELF-TEST FAILED: $what was accepted" >&2; return 1
  fi
  if ! grep -qiF -- "$want" <<<"$out"; then
    echo "SELF-TEST FAILED: $what was refused, but not for '$want':" >&2
    echo "$out" | tail -5 >&2; return 1
  fi
  echo "  refused: $what ($want)"
}

self_test() {
  local ok=0 t="$work/self-test"
  mkdir -p "$t"
  render() { "$helm" template ember-cloud helm/ember --kube-version "$kube_version" "$@"; }

  # Values that values.schema.json or the chart's own rules refuse.
  refuses "an unknown mode" "/mode" render --set mode=fog || ok=1
  refuses "a misspelt value (additionalProperties)" "additional properties" render --set gpu.cnt=2 || ok=1
  refuses "port 0" "/server/port" render --set server.port=0 || ok=1
  refuses "an upstream that is not a URL" "/edge/upstream" render --set mode=edge --set edge.upstream=cloud:8080 || ok=1
  refuses "two model sources" "exactly one source" render --set models.pvc.claimName=models || ok=1
  refuses "an autoscaled DaemonSet" "cannot be autoscaled" render --set mode=edge --set autoscaling.enabled=true || ok=1
  refuses "auth without keys" "auth.apiKeys" render --set auth.enabled=true || ok=1

  # A template with a syntax error: a copy of the chart with an `if` never closed.
  cp -R helm/ember "$t/broken-syntax"
  echo '{{- if .Values.mode }}' >>"$t/broken-syntax/templates/service.yaml"
  refuses "a template with an unclosed if (helm lint)" "unexpected EOF" "$helm" lint --strict "$t/broken-syntax" || ok=1
  refuses "a template with an unclosed if (helm template)" "unexpected EOF" "$helm" template x "$t/broken-syntax" || ok=1

  # A template that renders, but a manifest the Kubernetes schema refuses (an unknown field).
  cp -R helm/ember "$t/bad-field"
  sed -i 's/^  type: {{ .Values.service.type }}/&\n  sessionAfinity: None/' "$t/bad-field/templates/service.yaml"
  refuses "a Service with a misspelt field" "sessionAfinity" check_chart "$t/bad-field" default || ok=1

  # A ServiceMonitor with a misspelt field (checked by the subset schema in check_manifests.py).
  cp -R helm/ember "$t/bad-monitor"
  sed -i 's/scrapeTimeout:/scrapeTimout:/' "$t/bad-monitor/templates/servicemonitor.yaml"
  refuses "a ServiceMonitor with a misspelt field" "scrapeTimout" check_chart "$t/bad-monitor" gpu || ok=1

  # A pod that breaks the chart's promises: the drain longer than the termination grace.
  cp -R helm/ember "$t/short-grace"
  sed -i 's/^{{- add .Values.server.preStopSleepSeconds .*/{{- .Values.server.shutdownGraceSeconds }}/' \
    "$t/short-grace/templates/_helpers.tpl"
  refuses "a termination grace shorter than the drain" "terminationGracePeriodSeconds" check_chart "$t/short-grace" default || ok=1

  # Dockerfiles: a lint error, a feature set nobody builds, a set test.sh does not lint.
  printf 'FROM debian\nRUN apt-get update && apt-get install curl\n' >"$t/Dockerfile.bad"
  refuses "a Dockerfile with an untagged base and apt-get without -y" "DL3006" lint_dockerfiles "$t/Dockerfile.bad" || ok=1
  printf 'FROM rust:1.95.0-bookworm\nRUN cargo build --release --locked --bin ember --features generate\n' >"$t/Dockerfile.odd"
  refuses "an image built with an unplanned feature set" "none of the project's builds" check_feature_sets "$test_sh" "$t/Dockerfile.odd" || ok=1
  grep -v 'cargo clippy.*--features' "$test_sh" >"$t/test.sh"
  refuses "the edge image when test.sh lints no edge build" "lints only" check_feature_sets "$t/test.sh" docker/Dockerfile.edge || ok=1
  return "$ok"
}

if ((self_test)); then
  step "self-test: each check refuses a broken input"
  self_test || failed=1
fi

if ((failed)); then
  echo "check_packaging: FAILED" >&2
  exit 1
fi
echo "check_packaging: all checks passed"
