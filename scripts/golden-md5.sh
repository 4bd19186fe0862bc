#!/usr/bin/env bash
# Byte-identity check for refactors: compresses the real SmolLM2-135M with LoRAP (its
# default, the FFN refit included), sfsd and mpo at 0.2 on 4 x 128 C4 calibration tokens
# with the given binary (default
# target/release/lorap-gpu) and prints one md5 per method over the shards and config.json.
# Run it before and after a change that must not alter results; the lines must match.
# Usage: bash scripts/golden-md5.sh [BINARY] [SCRATCH_DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$root/target/release/lorap-gpu}"
scratch="${2:-$(mktemp -d)}"
assets="$(bash "$root/scripts/fetch-assets.sh" | tail -n 1)"
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
for method in lorap sfsd mpo; do
  out="$scratch/golden-$method"
  "$bin" compress --quiet --model "$assets/smollm2-135m" --calib "$assets/text/c4.txt" --ratio 0.2 \
    --samples 4 --seq-len 128 --method "$method" --out "$out" --force >/dev/null
  sum=$(cd "$out" && cat config.json *.safetensors | md5sum | cut -d' ' -f1)
  echo "$method $sum"
done
