"""Loads a GGUF in llama.cpp (through llama-cpp-python's ctypes bindings on a llama.cpp
built from that package's sources) and measures what the interop check compares: the
parameter count and size llama.cpp reports, whether llama.cpp's tokenizer (read from the
GGUF) gives the same ids as tokenizer.json, and the NLL on `lorap-gpu eval`'s windows
(the same token ids fed to both; all logits of each window kept). With --vocab-test
VOCAB.gguf (one of llama.cpp's tokenizer test vocabularies, beside its .inp texts and .out
ids from Hugging Face's tokenizer), also every .inp text through llama.cpp's tokenizer read
from --gguf against the .out ids.

Usage: LLAMA_CPP_LIB_PATH=BUILD/bin PYTHONPATH=SRC python llama_check.py --gguf FILE
       --tokenizer-dir DIR --text FILE --seq-len 512 --max-tokens 4096 [--threads 2]
       [--vocab-test VOCAB.gguf]
Prints one JSON object."""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from vocab_model import vocab_tests  # noqa: E402
from windows import emit, summary, token_windows  # noqa: E402

import llama_cpp  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--tokenizer-dir", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab-test")
    a = ap.parse_args()
    t0 = time.time()
    llm = llama_cpp.Llama(
        model_path=a.gguf,
        n_ctx=a.seq_len,
        n_batch=a.seq_len,
        n_ubatch=a.seq_len,
        logits_all=True,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        verbose=False,
    )
    load_s = time.time() - t0
    windows = token_windows(a.tokenizer_dir, a.text, a.seq_len, a.max_tokens)
    nll = []
    t0 = time.time()
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        nll.append((lse - logits[np.arange(len(w) - 1), w[1:]]).tolist())
    prefill_s = time.time() - t0
    # the embedded tokenizer against tokenizer.json on the text's first ~16 KB
    with open(a.text, encoding="utf-8") as f:
        text = f.read(16384)
    text = text[: text.rfind("\n") + 1]
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(f"{a.tokenizer_dir}/tokenizer.json").encode(text, add_special_tokens=False).ids
    ll = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    same = next((i for i, (x, y) in enumerate(zip(hf, ll)) if x != y), min(len(hf), len(ll)))
    extra = {}
    if a.vocab_test:
        texts, want = vocab_tests(a.vocab_test)
        got = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) if t else [] for t in texts]
        bad = [{"text": t, "want": w, "got": g} for t, w, g in zip(texts, want, got) if w != g]
        extra["vocab_test"] = {"file": os.path.basename(a.vocab_test), "texts": len(texts), "tokens": sum(map(len, want)), "mismatches": len(bad), "first": bad[:3]}
    emit(
        summary(
            nll,
            runtime="llama.cpp",
            params=llama_cpp.llama_model_n_params(llm.model),
            model_bytes=llama_cpp.llama_model_size(llm.model),
            file_bytes=os.path.getsize(a.gguf),
            load_seconds=load_s,
            prefill_tokens_per_second=sum(len(w) for w in windows) / prefill_s,
            tokenizer={"tokens_hf": len(hf), "tokens_llama_cpp": len(ll), "identical": hf == ll, "first_difference": same},
            **extra,
        )
    )


if __name__ == "__main__":
    main()
