#!/usr/bin/env python3
"""PyTorch baseline of a `lorap-gpu compress` run: the same work, on the same tokens, with the
same ranks and the same kept FFN channels, timed per phase.

It reads the Rust run's compression_report.json (per-layer q/k/v/o ranks, the kept FFN
channels, the SVD's oversampling and power iterations, the calibration shape) and the
calibration token ids the run saved (`compress --save-calibration FILE`: little-endian u32,
window after window), then per layer, streaming weights from the dense model's safetensors:

  statistics     forward over every window, hooks summing the squares of each linear's inputs
                 (scale s_j = sqrt(sum / windows), zeros -> 1e-4, as calib::stats::scales)
  decomposition  activation-weighted randomized SVD of q/k/v/o at the report's ranks:
                 torch.svd_lowrank(W diag(s), q = rank + oversample, niter = power_iters),
                 A = U sqrt(S), B = sqrt(S) V^T diag(1/s) (the Rust factor pair)
  ffn            the Wanda-style channel scores are computed (the work the Rust run does), but
                 the kept channels are the report's, so both runs build the same layer
  propagation    the compressed layer (factor pairs as two products) maps the states onward
  load / write   safetensors reads to the GPU and (with --save) writing the compressed layers,
                 timed apart from the compute phases

Each phase is bracketed by torch.cuda.synchronize(). Two modes:
  fp32-strict  f32 weights and activations, TF32 off, SDPA's math kernel, f32 svd_lowrank
  best         bf16 weights and activations, TF32 on for the f32 SVD, SDPA flash attention,
               f32 svd_lowrank (the decomposition needs f32; the inputs are upcast)

Usage: python3 benches/pytorch_baseline.py --model DENSE_DIR --report RUST_OUT/compression_report.json
         --tokens CALIB.u32 --mode fp32-strict|best [--batch 2] [--save OUT_DIR] [--json FILE]
Prints a phase table and one JSON line. Needs torch (CUDA for the timings to mean anything)
and safetensors.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the dense model folder the Rust run compressed")
    ap.add_argument("--report", required=True, help="the Rust run's compression_report.json")
    ap.add_argument("--tokens", required=True, help="calibration ids written by compress --save-calibration")
    ap.add_argument("--mode", choices=["fp32-strict", "best"], default="fp32-strict")
    ap.add_argument("--batch", type=int, default=2, help="windows per forward batch")
    ap.add_argument("--save", help="write the compressed layers here (timed as 'write')")
    ap.add_argument("--json", help="also write the result JSON to this file")
    args = ap.parse_args()

    try:
        import torch
        import torch.nn.functional as F
        from safetensors import safe_open
    except ImportError as e:
        print(f"pytorch baseline skipped: {e}", file=sys.stderr)
        sys.exit(3)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    strict = args.mode == "fp32-strict"
    torch.backends.cuda.matmul.allow_tf32 = not strict
    torch.backends.cudnn.allow_tf32 = not strict
    act = torch.float32 if strict else torch.bfloat16

    rep = json.load(open(args.report))
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    svd_opts = rep["options"]["svd"]
    oversample, niter = int(svd_opts["oversample"]), int(svd_opts["power_iters"])
    weighted = bool(rep["options"].get("weighted_svd", True))
    windows, seq = int(rep["calibration_windows"]), int(rep["calibration_seq_len"])
    raw = open(args.tokens, "rb").read()
    if len(raw) != 4 * windows * seq:
        sys.exit(f"{args.tokens}: {len(raw) // 4} tokens, the report says {windows} x {seq}")
    ids = torch.frombuffer(bytearray(raw), dtype=torch.int32).view(windows, seq).long()

    index = os.path.join(args.model, "model.safetensors.index.json")
    if os.path.exists(index):
        wmap = json.load(open(index))["weight_map"]
    else:
        with safe_open(os.path.join(args.model, "model.safetensors"), "pt") as f:
            wmap = {k: "model.safetensors" for k in f.keys()}

    phases = {k: 0.0 for k in ("load", "statistics", "decomposition", "ffn", "propagation", "write")}

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(name):
        sync()
        t = time.perf_counter()
        yield
        sync()
        phases[name] += time.perf_counter() - t

    def tensor(name, dtype):
        with safe_open(os.path.join(args.model, wmap[name]), "pt", device="cpu") as f:
            return f.get_tensor(name).to(dev).to(dtype)

    d, nl = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim", d // nh)
    eps = cfg["rms_norm_eps"]
    if cfg.get("rope_scaling"):
        print("note: rope_scaling is ignored (the llama2-7b preset has none)", file=sys.stderr)

    def rms(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w

    def rope(x, cos, sin):
        h = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin

    def attention(q, k, v):
        if strict:
            # f32 math kernel, KV heads repeated for the query groups
            k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            if nkv != nh:
                k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    class Linear:
        """A dense weight or a factor pair (y = (x B^T) A^T, as the Rust forward runs it)."""

        def __init__(self, w=None, a=None, b=None):
            self.w, self.a, self.b = w, a, b

        def __call__(self, x):
            if self.w is not None:
                return x @ self.w.t()
            return (x @ self.b.t()) @ self.a.t()

    def layer_forward(lin, norms, h, cos, sin, hook=None):
        b, t, _ = h.shape

        def run(name, x):
            if hook is not None:
                hook(name, x)
            return lin[name](x)

        x = rms(h, norms[0])
        q = run("q", x).view(b, t, nh, hd).transpose(1, 2)
        k = run("k", x).view(b, t, nkv, hd).transpose(1, 2)
        v = run("v", x).view(b, t, nkv, hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = attention(q, k, v).transpose(1, 2).reshape(b, t, nh * hd)
        h = h + run("o", a)
        x = rms(h, norms[1])
        g = run("gate", x)
        u = run("up", x)
        return h + run("down", F.silu(g) * u)

    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    torch.manual_seed(0)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_all = time.perf_counter()
    with phase("load"):
        emb = tensor("model.embed_tokens.weight", act)
    with phase("propagation"):
        hs = [emb[ids[i:i + args.batch].to(dev)] for i in range(0, windows, args.batch)]
        del emb
        theta = cfg.get("rope_theta", 10000.0)
        inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
        ang = torch.arange(seq, device=dev, dtype=torch.float32)[:, None] * inv[None]
        ang = torch.cat((ang, ang), -1)
        cos, sin = ang.cos().to(act), ang.sin().to(act)
    agree = []
    if args.save:
        from safetensors.torch import save_file
        os.makedirs(args.save, exist_ok=True)
    for i, lr in enumerate(rep["layers"]):
        p = f"model.layers.{i}."
        with phase("load"):
            w = {n: tensor(p + s + ".weight", act) for n, s in names.items()}
            norms = (tensor(p + "input_layernorm.weight", act), tensor(p + "post_attention_layernorm.weight", act))
        sums = {}

        def hook(name, x):
            x2 = x.reshape(-1, x.shape[-1]).float()
            sums[name] = sums.get(name, 0) + x2.pow(2).sum(0)

        with phase("statistics"), torch.no_grad():
            dense = {n: Linear(w[n]) for n in names}
            for h in hs:
                layer_forward(dense, norms, h, cos, sin, hook)
            s = {n: (v / windows).sqrt().masked_fill(v == 0, 1e-4) for n, v in sums.items()}
        lin = {}
        with phase("decomposition"), torch.no_grad():
            for j, n in enumerate(("q", "k", "v", "o")):
                r = lr["ranks"][j]
                if r is None:
                    lin[n] = Linear(w[n])
                    continue
                sc = s[n] if weighted else torch.ones_like(s[n])
                ws = w[n].float() * sc[None]
                U, S, V = torch.svd_lowrank(ws, q=min(r + oversample, min(ws.shape)), niter=niter)
                root = S[:r].sqrt()
                a = U[:, :r] * root[None]
                b = (root[:, None] * V[:, :r].t()) / sc[None]
                lin[n] = Linear(a=a.to(act), b=b.to(act))
        with phase("ffn"), torch.no_grad():
            sg, sd = s["gate"], s["down"]
            scores = ((w["up"].float() * sg[None]).norm(dim=1) + (w["gate"].float() * sg[None]).norm(dim=1)
                      + w["down"].float().norm(dim=0) * sd)
            kept = lr.get("ffn_kept_channels") or []
            f = scores.numel()
            if kept:
                keep = torch.tensor(kept, device=dev)
                # the baseline's own choice, for the record: same formula, same reserve
                # methods::ffn::kept_channels: round(reserve f) lowest kept, the next removed
                res = min(int(math.floor(rep["options"].get("reserve", 0.01) * f + 0.5)), len(kept))
                removed = set(scores.argsort()[res:res + f - len(kept)].tolist())
                agree.append(len(set(kept) - removed) / len(kept))
            else:
                keep = torch.arange(f, device=dev)
            lin["gate"], lin["up"] = Linear(w["gate"][keep]), Linear(w["up"][keep])
            lin["down"] = Linear(w["down"][:, keep].contiguous())
        with phase("propagation"), torch.no_grad():
            hs = [layer_forward(lin, norms, h, cos, sin) for h in hs]
        if args.save:
            with phase("write"):
                out = {}
                for n, l in lin.items():
                    if l.w is not None:
                        out[p + names[n] + ".weight"] = l.w.to(torch.float16).cpu().contiguous()
                    else:
                        out[p + names[n] + ".a"] = l.a.to(torch.float16).cpu().contiguous()
                        out[p + names[n] + ".b"] = l.b.to(torch.float16).cpu().contiguous()
                save_file(out, os.path.join(args.save, f"layer-{i:05d}.safetensors"))
        del w, lin, dense
        print(f"layer {i + 1}/{len(rep['layers'])} {time.perf_counter() - t_all:.1f} s", file=sys.stderr, flush=True)
    sync()
    secs = time.perf_counter() - t_all
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else 0
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"| phase ({args.mode}, {device}) | seconds |")
    print("| --- | ---: |")
    for k, v in phases.items():
        print(f"| {k} | {v:.2f} |")
    print(f"| total (wall) | {secs:.2f} |")
    if agree:
        print(f"\nFFN channels: the baseline's own scores agree with the Rust run's kept set on {100 * sum(agree) / len(agree):.2f}% of the kept channels (the report's set is used)")
    res = {"baseline": "pytorch", "mode": args.mode, "device": device, "torch": torch.__version__, "seconds": secs,
           "phases": phases, "peak_gpu_bytes": peak, "windows": windows, "seq_len": seq, "layers": len(rep["layers"]),
           "ranks_layer0": rep["layers"][0]["ranks"] if rep["layers"] else None}
    line = json.dumps(res)
    print(line)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
