#!/usr/bin/env bash
# Produces the LoRAP results table (docs/results.md) on the real SmolLM2-135M: for each
# ratio, LoRAP and its ablations, held-out Wikipedia perplexity (the first TOKENS tokens of
# wiki.txt; calibration uses C4 text, so no calibration window is evaluated).
# Usage: bash scripts/results-table.sh [RATIOS...]   (default 0.2 0.3 0.5)
# Env: SAMPLES (8), SEQ_LEN (128), TOKENS (2048), EVAL_LEN (512: held-out window length), OUT (a scratch folder), BIN (a prebuilt
# lorap-gpu binary; default: build this checkout), VARIANTS (space-separated row names from
# the catalogue below; default: LoRAP as published and its four ablations; `default` is
# compress's own default), EXTRA_VARIANTS=1 adds the non-default allocation (spectrum). The related methods are rows too:
#   VARIANTS="sfsd mpo" bash scripts/results-table.sh 0.2 0.3 0.5
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
assets="$(bash scripts/fetch-assets.sh | tail -n 1)"
if [ -z "${BIN:-}" ]; then cargo build --release --quiet; fi
bin="${BIN:-target/release/lorap-gpu}"
scratch="${OUT:-$(mktemp -d)}"; mkdir -p "$scratch"; rm -f "$scratch"/*.eval.json
samples="${SAMPLES:-8}"; seq="${SEQ_LEN:-128}"; tokens="${TOKENS:-2048}"; eval_len="${EVAL_LEN:-512}"
ratios=("$@"); [ ${#ratios[@]} -gt 0 ] || ratios=(0.2 0.3 0.5)
# held-out perplexity of model $1; its per-window NLLs are kept in $2 (paired comparisons)
ppl() { "$bin" --quiet eval --model "$1" --text "$assets/text/wiki.txt" --seq-len "$eval_len" --max-tokens "$tokens" --json > "$2"; python3 -c 'import json,sys; print("%.3f" % json.load(open(sys.argv[1]))["perplexity"]["perplexity"])' "$2"; }
# paired against LoRAP at the same ratio: windows where $1 has the lower NLL, and the mean
# NLL difference (row - LoRAP) with its standard error over windows
paired() { [ -f "$2" ] && [ "$1" != "$2" ] || { echo "-"; return; }; python3 - "$1" "$2" <<'PY'
import json, math, sys
a, b = (json.load(open(f))["perplexity"]["window_mean_nll"] for f in sys.argv[1:3])
d = [x - y for x, y in zip(a, b)]
m = sum(d) / len(d); se = math.sqrt(sum((x - m) ** 2 for x in d) / max(len(d) - 1, 1) / len(d))
print("%d/%d, %+.4f +- %.4f" % (sum(x < 0 for x in d), len(d), m, se))
PY
}
echo "| ratio | variant | flags | held-out ppl | decoder removed | vs LoRAP: windows better, mean NLL diff |"
echo "| --- | --- | --- | ---: | ---: | --- |"
echo "| 0 | dense | | $(ppl "$assets/smollm2-135m" "$scratch/dense.eval.json") | 0% | - |"
# LoRAP as the paper defines it; compress's defaults differ (the FFN refit, no reservation)
paper="--no-ffn-refit --ffn-reserve 0.01"
catalogue() {
  cat <<CATALOGUE
lorap|lorap as published (fixed 3:1 ranks, 1% reservation, no refit)|$paper
plain-svd|plain-svd|$paper --plain-svd
uniform-ranks|uniform-ranks|$paper --allocation uniform
no-reserve|no-reserve|--no-ffn-refit
magnitude-ffn|magnitude-ffn|$paper --magnitude-ffn
spectrum|spectrum-allocation|$paper --allocation spectrum
relative|relative-spectrum allocation|$paper --allocation relative
default|compress's default (FFN refit, no reservation)|
sfsd|sfsd (feature-space, all linears)|--method sfsd
sfsd-centred|sfsd, mean-centred covariance|--method sfsd --sfsd-centred
mpo|mpo (3 cores, all linears)|--method mpo
mpo-shared|mpo, shared centre|--method mpo --mpo-share-centre
CATALOGUE
}
wanted="${VARIANTS:-lorap plain-svd uniform-ranks no-reserve magnitude-ffn${EXTRA_VARIANTS:+ spectrum}}"
for r in "${ratios[@]}"; do
  for key in $wanted; do
    line=$(catalogue | grep "^$key|" || true)
    [ -n "$line" ] || { echo "unknown variant $key" >&2; exit 2; }
    name=$(echo "$line" | cut -d'|' -f2); flags=$(echo "$line" | cut -d'|' -f3)
    out="$scratch/$key-$r"
    # shellcheck disable=SC2086
    rep=$("$bin" --quiet compress --model "$assets/smollm2-135m" --ratio "$r" --calib "$assets/text/c4.txt" \
      --samples "$samples" --seq-len "$seq" --out "$out" --force --json $flags)
    removed=$(echo "$rep" | python3 -c 'import json,sys; print("%.2f%%" % (100*json.load(sys.stdin)["achieved_decoder_ratio"]))')
    p=$(ppl "$out" "$scratch/$key-$r.eval.json")
    echo "| $r | $name | \`$flags\` | $p | $removed | $(paired "$scratch/$key-$r.eval.json" "$scratch/lorap-$r.eval.json") |"
    rm -rf "$out"
  done
done
