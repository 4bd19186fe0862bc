#!/usr/bin/env python3
"""The PyTorch way of doing LoRAP's steps, as the baseline for `cargo bench --bench compress`.

Only for comparison on a machine that has PyTorch (and a CUDA GPU); nothing in the project
depends on it. It runs the same work as `lorap-gpu compress` on the same synthetic model
folder: per layer, forward hooks collect the input-feature sums of squares of every linear
over the calibration windows; q/k/v/o get the activation-weighted SVD (torch.linalg.svd,
full, on the GPU, as the reference code does) truncated to the fixed 3:1 ranks; the FFN
gets the Wanda-style channel scores with the 1% reservation; the compressed layer then
produces the next layer's inputs. Weights stream one layer at a time from safetensors.

Usage: python3 benches/pytorch_baseline.py MODEL_DIR [--windows 128 --seq 2048 --ratio 0.2]
Prints wall time and peak CUDA memory, and one JSON line like the Rust bench.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from safetensors import safe_open


def load_index(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        return json.load(open(index))["weight_map"]
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def tensor(model_dir, wmap, name, dev):
    with safe_open(os.path.join(model_dir, wmap[name]), "pt", device="cpu") as f:
        return f.get_tensor(name).to(dev, torch.float32)


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


class Layer(torch.nn.Module):
    def __init__(self, cfg, w):
        super().__init__()
        self.cfg = cfg
        self.lin = torch.nn.ModuleDict()
        for n, t in w.items():
            if n.endswith("norm"):
                continue
            lin = torch.nn.Linear(t.shape[1], t.shape[0], bias=False, device=t.device)
            lin.weight.data = t
            self.lin[n] = lin
        self.in_norm, self.post_norm = w["input_layernorm"], w["post_attention_layernorm"]

    def forward(self, h, cos, sin):
        c = self.cfg
        b, t, d = h.shape
        nh, nkv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
        hd = d // nh
        x = rms(h, self.in_norm, c["rms_norm_eps"])
        q = self.lin["q_proj"](x).view(b, t, nh, hd).transpose(1, 2)
        k = self.lin["k_proj"](x).view(b, t, nkv, hd).transpose(1, 2)
        v = self.lin["v_proj"](x).view(b, t, nkv, hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        h = h + self.lin["o_proj"](a)
        x = rms(h, self.post_norm, c["rms_norm_eps"])
        return h + self.lin["down_proj"](F.silu(self.lin["gate_proj"](x)) * self.lin["up_proj"](x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=2, help="windows per forward batch")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    wmap = load_index(args.model)
    d, nl = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    hd = d // nh
    torch.manual_seed(0)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    ids = torch.randint(0, cfg["vocab_size"], (args.windows, args.seq))
    emb = tensor(args.model, wmap, "model.embed_tokens.weight", dev)
    hs = [emb[ids[i:i + args.batch].to(dev)] for i in range(0, args.windows, args.batch)]
    del emb
    inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
    ang = torch.arange(args.seq, device=dev, dtype=torch.float32)[:, None] * inv[None]
    ang = torch.cat((ang, ang), -1)
    cos, sin = ang.cos(), ang.sin()
    keep = 1 - args.ratio
    for i in range(nl):
        p = f"model.layers.{i}."
        w = {n: tensor(args.model, wmap, p + s + ".weight", dev) for n, s in [
            ("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"), ("v_proj", "self_attn.v_proj"),
            ("o_proj", "self_attn.o_proj"), ("gate_proj", "mlp.gate_proj"), ("up_proj", "mlp.up_proj"),
            ("down_proj", "mlp.down_proj"), ("input_layernorm", "input_layernorm"),
            ("post_attention_layernorm", "post_attention_layernorm")]}
        layer = Layer(cfg, w)
        sums = {}

        def hook(name):
            def f(mod, inp, out):
                x = inp[0].reshape(-1, inp[0].shape[-1])
                sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            return f

        handles = [layer.lin[n].register_forward_hook(hook(n)) for n in layer.lin]
        with torch.no_grad():
            for h in hs:
                layer(h, cos, sin)
        for hd_ in handles:
            hd_.remove()
        s = {n: (v / args.windows).sqrt().clamp_min(1e-4) for n, v in sums.items()}
        # attention: weighted SVD, fixed 3:1 ranks
        shapes = {n: w[n].shape for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        budget = keep * sum(a * b for a, b in shapes.values())
        per = lambda n: sum(shapes[n])
        r_vo = int(0.75 * budget // (per("v_proj") + per("o_proj")))
        r_qk = int((budget - r_vo * (per("v_proj") + per("o_proj"))) // (per("q_proj") + per("k_proj")))
        with torch.no_grad():
            for n, r in [("q_proj", r_qk), ("k_proj", r_qk), ("v_proj", r_vo), ("o_proj", r_vo)]:
                out_d, in_d = shapes[n]
                if r * (out_d + in_d) >= out_d * in_d:
                    continue
                U, S, Vh = torch.linalg.svd(w[n] * s[n][None], full_matrices=False)
                a = U[:, :r] * S[:r].sqrt()
                b = (S[:r].sqrt()[:, None] * Vh[:r]) / s[n][None]
                layer.lin[n].weight.data = a @ b  # same function as the factor pair
            # FFN: Wanda-style channel scores, keep the lowest 1%, drop the next ratio
            sc = ((w["up_proj"].abs() * s["up_proj"][None]).norm(dim=1) + (w["gate_proj"].abs() * s["gate_proj"][None]).norm(dim=1)
                  + w["down_proj"].norm(dim=0) * s["down_proj"])
            order = sc.argsort()
            f = sc.numel()
            res = math.ceil(0.01 * f)
            remove = order[res:res + round(args.ratio * f)]
            mask = torch.ones(f, dtype=torch.bool, device=dev)
            mask[remove] = False
            for n in ("gate_proj", "up_proj"):
                layer.lin[n].weight.data = layer.lin[n].weight.data[mask]
            layer.lin["down_proj"].weight.data = layer.lin["down_proj"].weight.data[:, mask]
            hs = [layer(h, cos, sin) for h in hs]
        del layer, w
        print(f"layer {i + 1}/{nl} {time.time() - t0:.1f} s", flush=True)
    if dev == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t0
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
    print(f"pytorch baseline: {secs:.1f} s, peak CUDA memory {peak / 2**30:.2f} GiB on {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}")
    print(json.dumps({"baseline": "pytorch", "seconds": secs, "peak_gpu_bytes": peak, "windows": args.windows, "seq_len": args.seq, "device": dev}))


if __name__ == "__main__":
    main()
