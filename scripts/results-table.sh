#!/usr/bin/env bash
# Produces the LoRAP results table (docs/results.md) on the real SmolLM2-135M: for each
# ratio, LoRAP and its ablations, held-out Wikipedia perplexity (the first TOKENS tokens of
# wiki.txt; calibration uses C4 text, so no calibration window is evaluated).
# Usage: bash scripts/results-table.sh [RATIOS...]   (default 0.2 0.3 0.5)
# Env: SAMPLES (8), SEQ_LEN (128), TOKENS (2048), OUT (a scratch folder), BIN (a prebuilt
# lorap-gpu binary; default: build this checkout), EXTRA_VARIANTS=1 adds the non-default
# allocations (spectrum) as rows.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
assets="$(bash scripts/fetch-assets.sh | tail -n 1)"
if [ -z "${BIN:-}" ]; then cargo build --release --quiet; fi
bin="${BIN:-target/release/lorap-gpu}"
scratch="${OUT:-$(mktemp -d)}"
samples="${SAMPLES:-8}"; seq="${SEQ_LEN:-128}"; tokens="${TOKENS:-2048}"
ratios=("$@"); [ ${#ratios[@]} -gt 0 ] || ratios=(0.2 0.3 0.5)
ppl() { "$bin" --quiet eval --model "$1" --text "$assets/text/wiki.txt" --seq-len 512 --max-tokens "$tokens" --json | python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["perplexity"]["perplexity"])'; }
echo "| ratio | variant | flags | held-out ppl | decoder removed |"
echo "| --- | --- | --- | ---: | ---: |"
echo "| 0 | dense | | $(ppl "$assets/smollm2-135m") | 0% |"
for r in "${ratios[@]}"; do
  while IFS='|' read -r name flags; do
    [ -n "$name" ] || continue
    out="$scratch/$name-$r"
    # shellcheck disable=SC2086
    rep=$("$bin" --quiet compress --model "$assets/smollm2-135m" --ratio "$r" --calib "$assets/text/c4.txt" \
      --samples "$samples" --seq-len "$seq" --out "$out" --force --json $flags)
    removed=$(echo "$rep" | python3 -c 'import json,sys; print("%.2f%%" % (100*json.load(sys.stdin)["achieved_decoder_ratio"]))')
    echo "| $r | $name | \`$flags\` | $(ppl "$out") | $removed |"
    rm -rf "$out"
  done <<VARIANTS
lorap (fixed 3:1 ranks)|
plain-svd|--plain-svd
uniform-ranks|--allocation uniform
no-reserve|--no-reserve
magnitude-ffn|--magnitude-ffn
$( [ -n "${EXTRA_VARIANTS:-}" ] && echo "spectrum-allocation|--allocation spectrum" )
VARIANTS
done
