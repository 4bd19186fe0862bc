"""Negative controls for the GGUF NLL check: a copy of an f32 GGUF with one deliberate
mistake, so `llama_check.py` on it shows how far the mean NLL moves when the export gets
that part wrong (the check's 1e-3 bound is only meaningful if such mistakes move it by more).

  --mode zero-qkv-bias    every blk.N.attn_{q,k,v}.bias set to 0 (the biases lost)
  --mode hf-rope-layout   attn_q / attn_k rows (and biases) put back in Hugging Face's
                          half-split order (the interleave for llama.cpp's rope skipped)

Usage: python gguf_control.py --gguf IN.gguf --out OUT.gguf --mode MODE --head-dim D"""

import argparse
import re
import shutil

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["zero-qkv-bias", "hf-rope-layout"], required=True)
    ap.add_argument("--head-dim", type=int, default=0)
    a = ap.parse_args()
    import gguf

    shutil.copyfile(a.gguf, a.out)
    r = gguf.GGUFReader(a.out, "r+")
    changed = 0
    for t in r.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise SystemExit(f"{t.name}: controls are made from f32 GGUFs")
        data = t.data  # a writable view into the copy
        if a.mode == "zero-qkv-bias" and re.fullmatch(r"blk\.\d+\.attn_[qkv]\.bias", t.name):
            data[...] = 0
            changed += 1
        elif a.mode == "hf-rope-layout" and re.fullmatch(r"blk\.\d+\.attn_[qk]\.(weight|bias)", t.name):
            rows = data.reshape(data.shape[0] if data.ndim > 1 else data.shape[0], -1)
            d = a.head_dim
            heads = rows.shape[0] // d
            # interleaved row h*d + 2i + p held Hugging Face's row h*d + p*d/2 + i
            order = np.array([h * d + 2 * i + p for h in range(heads) for p in range(2) for i in range(d // 2)])
            rows[...] = rows[order].copy()
            changed += 1
    print(f"{a.mode}: {changed} tensors changed in {a.out}")


if __name__ == "__main__":
    main()
