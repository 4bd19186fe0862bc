#!/usr/bin/env bash
# The main job on the real test model: fetch SmolLM2-135M and text (cached), compress it by
# 20% with LoRAP calibrated on C4 text, then compare held-out Wikipedia perplexity of the
# dense and compressed models, and writes the HTML report into the output folder. Runs on a
# GPU if there is one, else on lavapipe: on a fresh 2-core machine without GPU it took 15.5
# minutes end to end (driver install, asset fetch, release build, 7 min of compression
# before the SVD products moved to the vec4 kernel, 2 x 2,048-token evaluations).
# Override with RATIO, SAMPLES, SEQ_LEN, TOKENS, OUT.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if ! ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || ! ldconfig -p | grep -q libvulkan.so.1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends mesa-vulkan-drivers libvulkan1 >&2
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
assets="$(bash scripts/fetch-assets.sh | tail -n 1)"
cargo build --release --quiet
bin=target/release/lorap-gpu
out="${OUT:-$assets/smollm2-135m-lorap-${RATIO:-0.2}}"
"$bin" compress --model "$assets/smollm2-135m" --ratio "${RATIO:-0.2}" --calib "$assets/text/c4.txt" \
  --samples "${SAMPLES:-16}" --seq-len "${SEQ_LEN:-128}" --out "$out" --force
# held-out perplexity of both models (Wikipedia, not the C4 calibration text), into the report
"$bin" report --model "$out" --base "$assets/smollm2-135m" --text "$assets/text/wiki.txt" --seq-len 512 --max-tokens "${TOKENS:-2048}"
"$bin" generate --model "$out" --prompt "The capital of France is" --max-new 8
