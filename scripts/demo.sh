#!/usr/bin/env bash
# The main job on the real test model: fetch SmolLM2-135M and text (cached), compress it by
# 20% with LoRAP calibrated on C4 text, then compare held-out Wikipedia perplexity of the
# dense and compressed models. Runs on a GPU if there is one, else on lavapipe (slow:
# about 10 minutes with these small settings). Override with RATIO, SAMPLES, SEQ_LEN, TOKENS.
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
echo "dense model:"
"$bin" eval --model "$assets/smollm2-135m" --text "$assets/text/wiki.txt" --seq-len 512 --max-tokens "${TOKENS:-2048}"
echo "compressed model ($out):"
"$bin" eval --model "$out" --text "$assets/text/wiki.txt" --seq-len 512 --max-tokens "${TOKENS:-2048}"
"$bin" generate --model "$out" --prompt "The capital of France is" --max-new 8
