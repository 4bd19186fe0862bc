#!/usr/bin/env bash
# GPU benchmark in one command: builds the release binary, the test executables and the
# benches here, packs them (with the Vulkan loader) into .gpubench/, and runs on the GPU
# machine: every test executable, gpu-info, the kernel bench (GFLOP/s, % of the adapter's
# FP32/FP16 peaks), the synthetic LLaMA-2-7B compress at ratio 0.2 (one layer, then the whole
# model) with 128 x 2048 calibration tokens under --max-vram 6.5, and the PyTorch baseline
# (benches/pytorch_baseline.py, modes fp32-strict and best) on the same synthetic folder,
# ranks, kept channels and tokens. Writes one markdown report named after the adapter.
#
#   scripts/gpu-bench.sh --quick            build, pack and run here with small shapes
#                                           (lavapipe: SmolLM2-135M-shaped synthetic model)
#   scripts/gpu-bench.sh --stage pack       build and pack only (here)
#   scripts/gpu-bench.sh --stage run [...]  run from .gpubench/ (on the GPU machine: the device
#                                           tool's `run` with carry [".gl", ".gpubench"])
# Options: --only tests,info,kernels,kernels-checked,layer,full,pytorch (a subset of the run's
# steps, to fit one device call's 10 minutes; kernels-checked reruns the kernel bench with
# LORAP_SHADER_CHECKS=checked, wgpu's runtime checks compiled in, to measure what they cost), --peak FP32[,FP16] (TFLOP/s, for adapters not in the bench's
# table), --out DIR (default $OUT on the device machine, else target/gpu-bench).
# One device call lasts at most 10 minutes and a machine left idle 30 s is given back bare, so
# each call must carry a whole step group, e.g. (full mode):
#   --only info,tests,kernels,kernels-checked      the suite and the kernel benches
#   --only layer,pytorch                           one 7B layer: Rust and both PyTorch modes
#   --only full        (GPU_BENCH_STEP_LIMIT=420)  synth (13.5 GB) + the whole 7B compress
#   --only full,pytorch                            the whole-model comparison, if the Rust run
#                                                  leaves time (a stopped step is reported)
# The report: DIR/gpu-bench-report.md; the log and the compress runs' JSON beside it (four
# files: the device machine sends back at most eight); synthetic models, compressed folders and
# calibration ids go to GPU_BENCH_MODELS (default target/gpu-bench-models).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

quick=0 stage=all only="tests,info,kernels,kernels-checked,layer,full,pytorch" peak="" out="${OUT:-$root/target/gpu-bench}"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --stage) stage="$2"; shift ;;
    --only) only="$2"; shift ;;
    --peak) peak="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu-bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
case "$stage" in all|pack|run) ;; *) echo "--stage must be all, pack or run" >&2; exit 2 ;; esac
want() { case ",$only," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
bundle="$root/.gpubench"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
export WGPU_BACKEND="${WGPU_BACKEND:-vulkan}"

pack() {
  echo "== build (release binary, test executables, benches)" >&2
  cargo build --release --quiet
  rm -rf "$bundle" && mkdir -p "$bundle/stage/tests" "$bundle/stage/benches"
  # test executables (default features: the real-model tests need downloads the GPU machine
  # cannot make) and bench executables, as cargo names them
  cargo test --release --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])' >"$bundle/tests.txt"
  cargo bench --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])' >"$bundle/benches.txt"
  while read -r name exe; do cp "$exe" "$bundle/stage/tests/$name"; done <"$bundle/tests.txt"
  while read -r name exe; do cp "$exe" "$bundle/stage/benches/$name"; done <"$bundle/benches.txt"
  cp target/release/lorap-gpu "$bundle/stage/lorap-gpu"
  # the executables know the paths they were built at (CARGO_MANIFEST_DIR, CARGO_BIN_EXE_*)
  echo "$root" >"$bundle/stage/manifest_dir"
  git rev-parse --short HEAD >"$bundle/stage/commit" 2>/dev/null || echo unknown >"$bundle/stage/commit"
  # one solid archive: the executables share most of their code, xz finds it across files
  tar -C "$bundle/stage" -cf - . | xz -T0 -9 >"$bundle/bundle.tar.xz"
  rm -rf "$bundle/stage"
  # the Vulkan loader for the GPU machine (device README); skipped quietly where apt is absent
  if [ ! -d .gl ] && command -v apt-get >/dev/null 2>&1 && [ "$quick" = 0 ]; then
    mkdir -p .gl /tmp/amd64/partial
    o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
    # shellcheck disable=SC2086
    (apt-get $o update -qq && cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2) >&2 \
      || echo "could not fetch the Vulkan loader packages into .gl/" >&2
  fi
  echo "packed: $(du -sh "$bundle" | cut -f1) in .gpubench/ (carry it, with .gl, to the GPU machine: 64 MiB at most)" >&2
}

run() {
  mkdir -p "$out"
  local work=/tmp/gpubench
  rm -rf "$work" && mkdir -p "$work"
  if command -v xz >/dev/null 2>&1; then
    tar -C "$work" -xJf "$bundle/bundle.tar.xz"
  else
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$bundle/bundle.tar.xz" "$work"
  fi
  # a fresh GPU machine has no Vulkan loader: the packed .debs (device README)
  if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 && ls .gl/*.deb >/dev/null 2>&1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
  fi
  if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] && [ -z "${VK_DRIVER_FILES:-}" ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  fi
  # paths compiled into the executables: the manifest folder and target/release/lorap-gpu
  local built; built="$(cat "$work/manifest_dir")"
  if [ "$built" != "$root" ] && [ ! -e "$built" ]; then mkdir -p "$(dirname "$built")" && ln -s "$root" "$built"; fi
  mkdir -p "$root/target/release"
  [ "$work/lorap-gpu" -ef "$root/target/release/lorap-gpu" ] || cp "$work/lorap-gpu" "$root/target/release/lorap-gpu"
  local bin="$root/target/release/lorap-gpu"
  local report="$out/gpu-bench-report.md" log="$out/gpu-bench.log"
  : >"$log"
  local adapter; adapter="$("$bin" gpu-info 2>>"$log" | sed -n 's/^selected: \(.*\) (.*/\1/p')"
  {
    echo "# GPU bench: ${adapter:-unknown adapter}"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), commit $(cat "$work/commit" 2>/dev/null || echo unknown), mode $([ "$quick" = 1 ] && echo quick || echo full), shader checks ${LORAP_SHADER_CHECKS:-trusted}"
    echo
  } >"$report"

  if want info; then
    { echo "## gpu-info"; echo; echo '```'; "$bin" gpu-info 2>>"$log"; echo '```'; echo; } >>"$report"
  fi

  if want tests; then
    echo "== test executables" >&2
    { echo "## Test executables on this adapter"; echo; echo "| executable | result |"; echo "| --- | --- |"; } >>"$report"
    local failed=0
    for t in "$work"/tests/*; do
      local name; name="$(basename "$t")"
      # the suite's f64-reference bounds are f32 bounds: the f16 tensor-core path is off for it,
      # except in its own tests (which ask for it and state their bound)
      if (cd "$root" && LORAP_COOPERATIVE_MATRIX=off "$t" --test-threads=4 >>"$log" 2>&1); then
        echo "| $name | $(grep -a 'test result' "$log" | tail -n 1 | sed 's/^test result: //') |" >>"$report"
      else
        failed=$((failed + 1))
        echo "| $name | FAILED (see gpu-bench.log) |" >>"$report"
      fi
    done
    echo >>"$report"
    [ "$failed" = 0 ] || echo "**$failed test executable(s) failed.**" >>"$report"
  fi

  if want kernels; then
    echo "== kernel bench" >&2
    local kargs=(); [ "$quick" = 1 ] && kargs+=(--quick); [ -n "$peak" ] && kargs+=(--peak "$peak")
    { echo "## Kernel bench"; echo; "$work/benches/kernels" "${kargs[@]}" 2>>"$log"; echo; } >>"$report"
  fi
  if want kernels-checked; then
    echo "== kernel bench, checked shader modules" >&2
    local kargs=(); [ "$quick" = 1 ] && kargs+=(--quick); [ -n "$peak" ] && kargs+=(--peak "$peak")
    { echo "## Kernel bench with wgpu's runtime checks (LORAP_SHADER_CHECKS=checked)"; echo
      LORAP_SHADER_CHECKS=checked "$work/benches/kernels" "${kargs[@]}" 2>>"$log"; echo; } >>"$report"
  fi

  # synthetic model, calibration text of random in-vocabulary words, compress at 0.2
  local preset=llama2-7b windows=128 seq=2048 vram=6.5
  if [ "$quick" = 1 ]; then preset=smollm2-135m windows=4 seq=128; fi
  local models="${GPU_BENCH_MODELS:-$root/target/gpu-bench-models}"
  # one step's time limit (a device call lasts at most 10 minutes)
  local step_limit="${GPU_BENCH_STEP_LIMIT:-540}"
  mkdir -p "$models"
  compress_case() { # $1 = label, $2 = layers ("" = all)
    # the models and their outputs stay out of DIR (the device machine sends DIR back)
    local label="$1" layers="$2" dir="$models/$preset-${2:-all}" res="$models/compress-$1"
    if [ ! -f "$dir/config.json" ]; then
      "$bin" --quiet synth --preset "$preset" ${layers:+--layers "$layers"} --out "$dir" --force 2>>"$log"
    fi
    local vocab; vocab="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vocab_size"])' "$dir/config.json")"
    # word-level synthetic tokenizer: ids 17.. are the words w17, w18, ...
    awk -v n=$((windows * seq * 11 / 10 + 1000)) -v v="$vocab" 'BEGIN { srand(7); for (i = 0; i < n; i++) printf "w%d%s", 17 + int(rand() * (v - 17)), (i % 20 == 19 ? "\n" : " ") }' >"$models/calib.txt"
    local t0; t0=$(date +%s%N)
    # a step that would outlast the device call is stopped, and the report says how far it got
    # (the progress lines go to the log)
    local rc=0
    timeout "$step_limit" "$bin" compress --model "$dir" --ratio 0.2 --calib "$models/calib.txt" --samples "$windows" --seq-len "$seq" \
      --max-vram "$vram" --out "$res.model" --force --json --save-calibration "$res.tokens.u32" >"$out/compress-$label.json" 2>"$res.progress" || rc=$?
    cat "$res.progress" >>"$log"
    local t1; t1=$(date +%s%N)
    echo "## lorap-gpu compress: synthetic $preset, $label (${layers:-all} layer(s)), ratio 0.2, $windows x $seq tokens, --max-vram $vram" >>"$report"
    echo >>"$report"
    if [ "$rc" != 0 ]; then
      { [ "$rc" = 124 ] && echo "stopped after ${step_limit} s (GPU_BENCH_STEP_LIMIT); last progress: \`$(tr '\r' '\n' <"$res.progress" | grep -a . | tail -n 1)\`" \
          || echo "failed (exit $rc): \`$(tail -n 1 "$res.progress")\`"; echo; } >>"$report"
      rm -f "$out/compress-$label.json"
      return 0
    fi
    {
      python3 - "$out/compress-$label.json" "$(( (t1 - t0) / 1000000 ))" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"wall {float(sys.argv[2]) / 1e3:.1f} s (process), run {r['seconds']:.1f} s, peak GPU memory {r['peak_gpu_bytes'] / 2**30:.2f} GiB, achieved decoder ratio {r['achieved_decoder_ratio']:.3f}, adapter {r['adapter']}")
print(f"ranks (q, k, v, o) of layer 0: {r['layers'][0]['ranks']}; FFN kept {r['layers'][0]['ffn_kept']} of {r['layers'][0]['ffn_total']}\n")
print("| phase | seconds |\n| --- | ---: |")
for k, v in r["phases"].items():
    if isinstance(v, (int, float)):
        print(f"| {k} | {v:.2f} |")
PY
      echo
    } >>"$report"
    if want pytorch; then
      echo "### PyTorch baseline on the same folder, ranks, kept channels and tokens" >>"$report"
      echo >>"$report"
      if python3 -c 'import torch, safetensors' 2>/dev/null; then
        for mode in fp32-strict best; do
          timeout "$step_limit" python3 benches/pytorch_baseline.py --model "$dir" --report "$res.model/compression_report.json" --tokens "$res.tokens.u32" \
            --mode "$mode" --json "$res.torch-$mode.json" 2>>"$log" | grep -v '^{' >>"$report" || echo "PyTorch $mode failed (see gpu-bench.log)" >>"$report"
          echo >>"$report"
        done
      else
        echo "skipped: PyTorch (with safetensors) is not installed here (\`python3 -c 'import torch, safetensors'\` fails)." >>"$report"
        echo "PyTorch baseline skipped: torch/safetensors not importable" >&2
      fi
      echo >>"$report"
    fi
    rm -rf "$res.model.partial"
  }
  if want layer; then echo "== compress, one layer" >&2; compress_case one-layer 1; fi
  if want full; then
    echo "== compress, whole model" >&2
    if [ "$quick" = 1 ]; then compress_case whole 2; else compress_case whole ""; fi
  fi
  echo "report: $report" >&2
}

if [ "$stage" != run ]; then pack; fi
if [ "$stage" != pack ]; then run; fi
