"""Compares the interop measurements of one model folder against `lorap-gpu eval --json`
and prints a markdown table; exits 1 when a runtime misses its bound.

Bounds on the mean NLL, relative to the tool's: 1e-3 for transformers (float32) and GGUF
f32/f16 (the f16 rounding of multiplied-back factor pairs and f32 summation order are far
below it); 1e-2 for GGUF q8_0 (8-bit weights change the model a little: measured
1.6e-3 on SmolLM2-135M at 0.5).
Parameter counts must equal the tool's for transformers; llama.cpp's count is reported
with the difference the multiplied-back attention makes.

Usage: python compare.py NAME TOOL.json [RUNTIME_LABEL=FILE.json ...]"""

import json
import sys

BOUNDS = {"transformers": 1e-3, "gguf-f32": 1e-3, "gguf-f16": 1e-3, "gguf-q8_0": 1e-2}


def main():
    name, tool_path, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    tool = json.load(open(tool_path))
    ref, params = tool["perplexity"]["mean_nll"], tool["parameters"]
    rows = [("lorap-gpu eval", params, "", ref, 0.0, "", tool["perplexity"]["tokens_per_second"], "", "")]
    ok = True
    for item in rest:
        label, path = item.split("=", 1)
        r = json.load(open(path))
        rel = (r["mean_nll"] - ref) / ref
        bound = BOUNDS.get(label)
        passed = bound is None or abs(rel) <= bound
        if label == "transformers" and r["params"] != params:
            passed = False
        # the tokenizer checks fail the run too: a GGUF that tokenizes differently is wrong
        if "tokenizer" in r and not r["tokenizer"]["identical"]:
            passed = False
        if r.get("vocab_test", {}).get("mismatches"):
            passed = False
        ok &= passed
        size = r.get("file_bytes") or r.get("disk_bytes") or ""
        gen = r.get("generate_tokens_per_second") or r.get("bench_tg_tokens_per_second") or ""
        rows.append((label, r["params"], size, r["mean_nll"], rel, bound or "", r["prefill_tokens_per_second"], gen, "ok" if passed else "FAIL"))
    print(f"\n### {name}\n")
    print("| runtime | parameters | bytes on disk | mean NLL | rel. diff | bound | prefill tok/s | decode tok/s | |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    fmt = lambda x, f: (f % x) if isinstance(x, (int, float)) else str(x)  # noqa: E731
    for label, p, size, nll, rel, bound, pre, gen, verdict in rows:
        print(f"| {label} | {p} | {size} | {nll:.6f} | {rel:+.2e} | {bound} | {fmt(pre, '%.1f')} | {fmt(gen, '%.1f')} | {verdict} |")
    print()
    for item in rest:
        label, path = item.split("=", 1)
        r = json.load(open(path))
        if "round_trip" in r:
            rt = r["round_trip"]
            text = r["generated"].replace("\n", " ")
            print(f"- {label}: class {r['class']}; save_pretrained/from_pretrained round trip: {rt['params']} parameters, max |logit diff| {rt['max_abs_logit_diff']:.3g}; greedy continuation of \"The capital of France is\": \"{text}\"")
        if "tokenizer" in r:
            t = r["tokenizer"]
            print(f"- {label}: llama.cpp's tokenizer (from the GGUF) vs tokenizer.json on {t['tokens_hf']} tokens: {'identical' if t['identical'] else 'differ from token ' + str(t['first_difference'])}; llama-bench pp128 {r.get('bench_pp_tokens_per_second', float('nan')):.1f} tok/s")
        if "vocab_test" in r:
            v = r["vocab_test"]
            print(f"- {label}: llama.cpp's tokenizer on {v['file']}.inp ({v['texts']} texts, {v['tokens']} tokens) vs its .out ids (Hugging Face's): {v['mismatches']} texts differ")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
