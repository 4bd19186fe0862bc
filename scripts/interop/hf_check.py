"""Loads a model folder in Hugging Face transformers (CPU, float32) and measures what the
interop check compares: the parameter count, the NLL on `lorap-gpu eval`'s windows, the
prefill and greedy-generation speeds; for a `lorap` export also a save_pretrained /
from_pretrained round trip (same logits) and that generate runs.

Usage: python hf_check.py --model DIR --text FILE --seq-len 512 --max-tokens 4096
       [--remote-code] [--round-trip] [--gen-tokens 64] [--threads 2]
Prints one JSON object."""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from windows import emit, summary, token_windows  # noqa: E402


def window_nll(model, windows):
    out = []
    with torch.inference_mode():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            out.append(nll.tolist())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--remote-code", action="store_true")
    ap.add_argument("--round-trip", action="store_true")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(a.model, trust_remote_code=a.remote_code, dtype=torch.float32)
    model.eval()
    load_s = time.time() - t0
    params = sum(p.numel() for p in model.parameters())
    windows = token_windows(a.model, a.text, a.seq_len, a.max_tokens)
    t0 = time.time()
    nll = window_nll(model, windows)
    prefill_s = time.time() - t0
    extra = {
        "runtime": "transformers",
        "class": type(model).__name__,
        "params": params,
        "load_seconds": load_s,
        "prefill_tokens_per_second": sum(len(w) for w in windows) / prefill_s,
    }
    tok = AutoTokenizer.from_pretrained(a.model, trust_remote_code=a.remote_code)
    prompt = tok("The capital of France is", return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        model.generate(**prompt, max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.time()
        out = model.generate(**prompt, max_new_tokens=a.gen_tokens, min_new_tokens=a.gen_tokens, do_sample=False)
        gen_s = time.time() - t0
    new = out.shape[1] - prompt["input_ids"].shape[1]
    extra["generate_tokens_per_second"] = new / gen_s
    extra["generated"] = tok.decode(out[0, prompt["input_ids"].shape[1] :][:24])
    if a.round_trip:
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            tok.save_pretrained(d)
            again = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=a.remote_code, dtype=torch.float32)
            again.eval()
            with torch.inference_mode():
                ids = torch.tensor([windows[0]])
                diff = (model(input_ids=ids).logits - again(input_ids=ids).logits).abs().max().item()
            extra["round_trip"] = {
                "files": sorted(os.listdir(d)),
                "params": sum(p.numel() for p in again.parameters()),
                "max_abs_logit_diff": diff,
            }
    emit(summary(nll, **extra))


if __name__ == "__main__":
    main()
