"""Test models for the GGUF tokenizer checks, built offline from the vocabularies llama.cpp
ships for its own tokenizer tests (vendor/llama.cpp/models/ggml-vocab-NAME.gguf, with
NAME.gguf.inp: test texts, and NAME.gguf.out: the ids Hugging Face's tokenizer gave them).

  tokenizer VOCAB.gguf OUT/tokenizer.json [--style legacy|metaspace]
      rebuilds a Hugging Face tokenizer.json from the GGUF vocabulary and checks that the
      `tokenizers` library on it reproduces VOCAB.gguf.out for every text of VOCAB.gguf.inp
      (so the file is a faithful stand-in for the model's real tokenizer.json); exits 1 if not.
      llama (SentencePiece): BPE with byte_fallback, merges = every split of a piece into two
      pieces, ordered by the merged piece's score (how transformers converts a SentencePiece
      model); `legacy` = Llama-2's normalizer (Prepend "▁", Replace " " -> "▁"), `metaspace` =
      the newer form (a Metaspace pre-tokenizer, prepend_scheme "first", no split).
      gpt2 + qwen2 pre-tokenizer: byte-level BPE with the GGUF's merges, NFC, Qwen2's regex.
  model DIR --type llama|qwen2 [--layers 2 --hidden 64 --ffn 160 --heads 4 --kv-heads 2
      --vocab N --tied --seed 0 --qk-gain 6]
      writes DIR/config.json and DIR/model.safetensors: random weights at a scale that keeps
      the logits far from uniform (uniform with std 1/sqrt(fan_in), embeddings of std ~0.6,
      norms near 1, qwen2's q/k/v biases of std ~0.3), q and k (weights and biases) times
      --qk-gain so attention is sharp enough for positions to matter: at gain 1 attention is
      nearly uniform and skipping the rope's row interleave moved the NLL by only 4e-4 to
      7e-4, under the check's 1e-3 bound (docs/interop.md).

Facts about the formats come from tokenizers' JSON schema and llama.cpp's gguf-py reader;
nothing here is copied from either."""

import argparse
import json
import os
import sys

import numpy as np

QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SEP = "\n__ggml_vocab_test__\n"
# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def read_vocab(path):
    import gguf

    r = gguf.GGUFReader(path)

    def arr(key, conv):
        f = r.fields.get(key)
        return None if f is None else [conv(f.parts[i]) for i in f.data]

    def scalar(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    return {
        "model": scalar("tokenizer.ggml.model"),
        "pre": scalar("tokenizer.ggml.pre"),
        "tokens": arr("tokenizer.ggml.tokens", lambda p: bytes(p).decode("utf-8")),
        "scores": arr("tokenizer.ggml.scores", lambda p: float(p[0])),
        "types": arr("tokenizer.ggml.token_type", lambda p: int(p[0])),
        "merges": arr("tokenizer.ggml.merges", lambda p: bytes(p).decode("utf-8")),
        "bos": scalar("tokenizer.ggml.bos_token_id"),
        "eos": scalar("tokenizer.ggml.eos_token_id"),
        "unk": scalar("tokenizer.ggml.unknown_token_id"),
    }


def added(i, text):
    return {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}


def spm_tokenizer(v, style):
    toks, scores, types = v["tokens"], v["scores"], v["types"]
    vocab = {t: i for i, t in enumerate(toks)}
    # a merge for every way a piece splits into two pieces, the piece with the higher score
    # first: SentencePiece merges the adjacent pair whose concatenation scores highest
    merges = []
    for i, t in enumerate(toks):
        if types[i] != NORMAL:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], i, vocab[left], vocab[right], left, right))
    merges.sort()
    bos = toks[v["bos"]]
    unk = toks[v["unk"]]
    if style == "legacy":
        normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
        pre = None
    else:
        normalizer = None
        pre = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(i, t) for i, t in enumerate(toks) if types[i] in (CONTROL, UNKNOWN)],
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [v["bos"]], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[m[4], m[5]] for m in merges],
        },
    }


def qwen2_tokenizer(v):
    toks, types = v["tokens"], v["types"]
    specials = [i for i, t in enumerate(types) if t == CONTROL]
    # the GGUF pads the vocabulary to the model's embedding rows with user-defined
    # "[PADn]" tokens the real tokenizer.json does not have
    real = [i for i, t in enumerate(types) if t == NORMAL]
    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(i, toks[i]) for i in specials],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False}, bl]},
        "post_processor": bl,
        "decoder": bl,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {toks[i]: i for i in real},
            "merges": [m.split(" ", 1) for m in v["merges"]],
        },
    }


def vocab_tests(gguf_path):
    with open(gguf_path + ".inp", encoding="utf-8") as f:
        raw = f.read()
    texts = raw.split(SEP)
    if texts and texts[-1] == "":
        texts.pop()
    with open(gguf_path + ".out", encoding="utf-8") as f:
        want = [[int(x) for x in line.split()] for line in f.read().split("\n")][: len(texts)]
    return texts, want


def cmd_tokenizer(a):
    from tokenizers import Tokenizer

    v = read_vocab(a.vocab)
    tok = spm_tokenizer(v, a.style) if v["model"] == "llama" else qwen2_tokenizer(v)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    t = Tokenizer.from_file(a.out)
    texts, want = vocab_tests(a.vocab)
    bad = [(s, w, t.encode(s, add_special_tokens=False).ids) for s, w in zip(texts, want) if t.encode(s, add_special_tokens=False).ids != w]
    print(json.dumps({"tokenizer": a.out, "texts": len(texts), "tokens": sum(map(len, want)), "mismatches": len(bad), "merges": len(tok["model"]["merges"])}))
    for s, w, g in bad[:5]:
        print(f"  {s!r}: want {w} got {g}", file=sys.stderr)
    sys.exit(1 if bad else 0)


def cmd_model(a):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(a.seed)
    d, f, h, kv = a.hidden, a.ffn, a.heads, a.kv_heads
    hd = d // h

    def uni(shape, std, offset=0.0):
        return (offset + std * np.sqrt(3.0) * rng.uniform(-1, 1, size=shape)).astype(np.float32)

    w = {"model.embed_tokens.weight": uni((a.vocab, d), 0.6), "model.norm.weight": uni((d,), 0.06, 1.0)}
    if not a.tied:
        w["lm_head.weight"] = uni((a.vocab, d), 1 / np.sqrt(d))
    for i in range(a.layers):
        p = f"model.layers.{i}."
        for name, out, inp in [("self_attn.q_proj", h * hd, d), ("self_attn.k_proj", kv * hd, d), ("self_attn.v_proj", kv * hd, d), ("self_attn.o_proj", d, h * hd), ("mlp.gate_proj", f, d), ("mlp.up_proj", f, d), ("mlp.down_proj", d, f)]:
            gain = a.qk_gain if name in ("self_attn.q_proj", "self_attn.k_proj") else 1.0
            w[p + name + ".weight"] = uni((out, inp), gain / np.sqrt(inp))
        if a.type == "qwen2":
            for name, out in [("q_proj", h * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)]:
                w[p + f"self_attn.{name}.bias"] = uni((out,), 0.3 * (a.qk_gain if name != "v_proj" else 1.0))
        w[p + "input_layernorm.weight"] = uni((d,), 0.06, 1.0)
        w[p + "post_attention_layernorm.weight"] = uni((d,), 0.06, 1.0)
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if a.type == "qwen2" else "LlamaForCausalLM"],
        "model_type": a.type,
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": a.layers,
        "num_attention_heads": h,
        "num_key_value_heads": kv,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6 if a.type == "qwen2" else 1e-5,
        "rope_theta": 1000000.0 if a.type == "qwen2" else 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": a.tied,
        "vocab_size": a.vocab,
        "bos_token_id": a.bos,
        "eos_token_id": a.eos,
        "torch_dtype": "float32",
    }
    if a.type == "qwen2":
        cfg.update({"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": a.layers})
    os.makedirs(a.dir, exist_ok=True)
    save_file(w, os.path.join(a.dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(a.dir, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer")
    t.add_argument("vocab")
    t.add_argument("out")
    t.add_argument("--style", choices=["legacy", "metaspace"], default="legacy")
    m = sub.add_parser("model")
    m.add_argument("dir")
    m.add_argument("--type", choices=["llama", "qwen2"], required=True)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--hidden", type=int, default=64)
    m.add_argument("--ffn", type=int, default=160)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--vocab", type=int, required=True)
    m.add_argument("--bos", type=int, required=True)
    m.add_argument("--eos", type=int, required=True)
    m.add_argument("--tied", action="store_true")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--qk-gain", type=float, default=6.0)
    a = ap.parse_args()
    cmd_tokenizer(a) if a.cmd == "tokenizer" else cmd_model(a)


if __name__ == "__main__":
    main()
