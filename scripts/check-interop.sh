#!/usr/bin/env bash
# Interop check: loads model folders (dense, or compressed by lorap-gpu) in Hugging Face
# transformers (custom code, `export --format hf`) and in llama.cpp (`export --format gguf`
# at each --type), and compares each runtime's parameter count and mean NLL on the same
# token windows with `lorap-gpu eval --json` (scripts/interop/compare.py states the bounds).
# Also runs lm-evaluation-harness (`lm_eval --model hf ... trust_remote_code=True`) on a
# local rolling-perplexity task, a save_pretrained/from_pretrained round trip and generate,
# and measures speeds (transformers prefill and greedy decode, llama-bench pp/tg).
#
# What it needs is installed once into a cached, git-ignored environment
# ($LORAP_INTEROP_CACHE, default .interop-cache/ in the repository): a venv with CPU torch
# (the CPU wheel index when reachable, else PyPI's torch), transformers, lm_eval, tokenizers;
# llama.cpp built (CPU, shared libraries) from the llama-cpp-python source distribution on
# PyPI (its vendored llama.cpp), whose ctypes bindings are used from the unpacked sources.
#
# Usage: bash scripts/check-interop.sh DIR [DIR...]
# Env: TEXT (held-out text; default $LORAP_ASSETS/text/wiki.txt), SEQ_LEN (512), MAX_TOKENS
# (2048), TYPES (GGUF types, "f32 f16 q8_0"), THREADS (2), LM_EVAL_LIMIT (4 documents; 0
# skips lm_eval), BIN (lorap-gpu binary; default target/release/lorap-gpu, built if absent),
# VOCAB_TEST (one of llama.cpp's tokenizer test vocabularies, models/ggml-vocab-NAME.gguf in
# its sources: each GGUF's tokenizer is also run on its .inp texts against the .out ids;
# scripts/interop/vocab_model.py builds test models from these vocabularies).
# Prints a markdown table per folder (also left in CACHE/check/NAME/report.md); exits 1
# if any runtime misses its bound.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -ge 1 ] || { sed -n '2,25p' "$0" >&2; exit 2; }
cache="${LORAP_INTEROP_CACHE:-$root/.interop-cache}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
seq_len="${SEQ_LEN:-512}"; max_tokens="${MAX_TOKENS:-2048}"; threads="${THREADS:-2}"
types="${TYPES:-f32 f16 q8_0}"; lm_limit="${LM_EVAL_LIMIT:-4}"
text="${TEXT:-${LORAP_ASSETS:-$root/assets/cache}/text/wiki.txt}"
[ -f "$text" ] || text="$(bash "$root/scripts/fetch-assets.sh" | tail -n 1)/text/wiki.txt"
bin="${BIN:-$root/target/release/lorap-gpu}"
[ -x "$bin" ] || (cd "$root" && cargo build --release --quiet)
say() { echo "[check-interop] $*" >&2; }

# --- the Python environment (once) ---
venv="$cache/venv"; py="$venv/bin/python"
llama_version=0.3.36
if [ ! -f "$venv/.ready" ]; then
  say "creating $venv (CPU torch, transformers, lm_eval; a few GB, once)"
  python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
  # the CPU-only wheel when its index is reachable; PyPI's torch (which also runs on CPU) otherwise
  "$py" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null || "$py" -m pip install -q torch
  "$py" -m pip install -q transformers "lm_eval[hf]" accelerate tokenizers numpy safetensors diskcache jinja2 typing-extensions cmake ninja
  touch "$venv/.ready"
fi

# --- llama.cpp from the llama-cpp-python source distribution (once) ---
src="$cache/src/llama_cpp_python-$llama_version"
build="$cache/llama-build"
if [ ! -x "$build/bin/llama-bench" ] || [ ! -f "$build/bin/libllama.so" ]; then
  if [ ! -d "$src" ]; then
    say "fetching llama-cpp-python $llama_version (source distribution)"
    mkdir -p "$cache/src"
    "$py" -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$llama_version" -d "$cache/src"
    tar xzf "$cache/src/llama_cpp_python-$llama_version.tar.gz" -C "$cache/src"
  fi
  say "building llama.cpp (CPU; tens of minutes on 2 cores, once)"
  mkdir -p "$build"
  PATH="$venv/bin:$PATH" cmake -S "$src/vendor/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  PATH="$venv/bin:$PATH" ninja -C "$build" -j "${JOBS:-2}" llama-bench llama-perplexity llama-completion >/dev/null
fi
export LLAMA_CPP_LIB_PATH="$build/bin"
llama_py() { PYTHONPATH="$src" "$py" "$@"; }

status=0
for dir in "$@"; do
  dir="$(cd "$dir" && pwd)"
  name="$(basename "$dir")"
  work="$cache/check/$name"
  rm -rf "$work"; mkdir -p "$work"
  say "$name: lorap-gpu eval"
  "$bin" --quiet eval --model "$dir" --text "$text" --seq-len "$seq_len" --max-tokens "$max_tokens" --json > "$work/tool.json"
  compressed=$("$py" -c 'import json,sys; print(int("lorap" in json.load(open(sys.argv[1]))))' "$dir/config.json")
  if [ "$compressed" = 1 ]; then
    "$bin" --quiet export --format hf --model "$dir" --out "$work/hf" >/dev/null
    hf="$work/hf"; remote=(--remote-code); trust=",trust_remote_code=True"
  else
    hf="$dir"; remote=(); trust=""
  fi
  say "$name: transformers"
  "$py" "$root/scripts/interop/hf_check.py" --model "$hf" --text "$text" --seq-len "$seq_len" --max-tokens "$max_tokens" \
    --threads "$threads" --round-trip "${remote[@]}" > "$work/transformers.json"
  # the folder's size on disk: the safetensors it loads
  "$py" - "$work/transformers.json" "$hf" <<'EOF'
import glob, json, os, sys
r = json.load(open(sys.argv[1]))
r["disk_bytes"] = sum(os.path.getsize(f) for f in glob.glob(os.path.join(sys.argv[2], "*.safetensors")))
json.dump(r, open(sys.argv[1], "w"), indent=1)
EOF
  pairs=("transformers=$work/transformers.json")
  for t in $types; do
    say "$name: gguf $t"
    "$bin" --quiet export --format gguf --type "$t" --model "$dir" --out "$work/gguf-$t" > "$work/gguf-$t.txt"
    llama_py "$root/scripts/interop/llama_check.py" --gguf "$work/gguf-$t/model.gguf" --tokenizer-dir "$dir" --text "$text" \
      --seq-len "$seq_len" --max-tokens "$max_tokens" --threads "$threads" ${VOCAB_TEST:+--vocab-test "$VOCAB_TEST"} > "$work/gguf-$t.json"
    # decode speed from llama.cpp's own benchmark (prompt 128, 64 generated tokens, 2 runs)
    "$build/bin/llama-bench" -m "$work/gguf-$t/model.gguf" -p 128 -n 64 -r 2 -t "$threads" -o json > "$work/bench-$t.json" 2>/dev/null || true
    "$py" - "$work/gguf-$t.json" "$work/bench-$t.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
try:
    for b in json.load(open(sys.argv[2])):
        key = "bench_tg_tokens_per_second" if b["n_gen"] else "bench_pp_tokens_per_second"
        r[key] = b["avg_ts"]
except Exception as e:  # a missing benchmark leaves the NLL comparison standing
    r["bench_error"] = str(e)
json.dump(r, open(sys.argv[1], "w"), indent=1)
EOF
    pairs+=("gguf-$t=$work/gguf-$t.json")
  done
  # on the custom-code export (a dense folder is the user's own Hugging Face checkpoint; the
  # test asset's lacks tokenizer_config.json, without which the harness finds no EOS token)
  [ "$compressed" = 1 ] || lm_limit=0
  if [ "$lm_limit" != 0 ]; then
    say "$name: lm-evaluation-harness"
    mkdir -p "$work/lm_eval_task"
    # documents: the held-out text's paragraphs of at least 400 characters
    "$py" - "$text" "$work/docs.jsonl" "$lm_limit" <<'EOF'
import json, sys
paras = [p.strip() for p in open(sys.argv[1], encoding="utf-8").read().split("\n\n") if len(p.strip()) >= 400]
with open(sys.argv[2], "w") as f:
    for p in paras[: int(sys.argv[3])]:
        f.write(json.dumps({"text": p}) + "\n")
EOF
    sed "s|DOCS_JSONL|$work/docs.jsonl|" "$root/scripts/interop/lm_eval_task/lorap_text.yaml" > "$work/lm_eval_task/lorap_text.yaml"
    "$venv/bin/lm_eval" --model hf --model_args "pretrained=$hf$trust,dtype=float32" --include_path "$work/lm_eval_task" \
      --tasks lorap_text --device cpu --batch_size 1 --output_path "$work/lm_eval" > "$work/lm_eval.txt" 2>&1 \
      && say "$name: lm_eval ran ($(grep -E 'word_perplexity' "$work/lm_eval.txt" | head -n 1 | tr -s ' '))" \
      || { say "$name: lm_eval FAILED (see $work/lm_eval.txt)"; status=1; }
  fi
  {
    "$py" "$root/scripts/interop/compare.py" "$name" "$work/tool.json" "${pairs[@]}" || status=1
    for t in $types; do echo "- gguf $t: $(cat "$work/gguf-$t.txt")"; done
    [ "$lm_limit" = 0 ] || echo "- lm_eval (lorap_text, $lm_limit documents): $(grep -E '\|.*(word_perplexity|byte_perplexity|bits_per_byte)' "$work/lm_eval.txt" | tr -s ' ' | paste -sd ' ' -)"
  } | tee "$work/report.md"
done
exit "$status"
