"""A model compressed by lorap-gpu, for Hugging Face transformers' custom-code loading.

Written by `lorap-gpu export --format hf` beside the weights; load with
AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True). It is transformers' own
LLaMA (same attention, rope, norms, cache and generation), with each kept decoder layer's
seven linears built as the `lorap` section of config.json says they are stored:

- a factor pair W ~ A B as two nn.Linear: `factor_b` (in -> rank, weight B) then
  `factor_a` (rank -> out, weight A), so the parameter count is rank * (in + out);
- an MPO chain as its cores (`mpo_core_K`, [left bond, row factor, column factor, right
  bond]), contracted into the dense matrix when the layer runs; a centre core shared by all
  layers is stored once under `model.mpo_shared`;
- a pruned FFN as gate/up/down of the kept width; anything else as a plain nn.Linear.

Dropped layers are simply absent (config.json's num_hidden_layers counts the kept ones).
"""

import torch
from torch import nn
from transformers import LlamaForCausalLM

from .configuration_lorap import LorapConfig

# the seven linears of a decoder layer, in the order of the `lorap` section's fields
LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
RANK_KEYS = ["q_rank", "k_rank", "v_rank", "o_rank", "gate_rank", "up_rank", "down_rank"]
# short names of the linears, as a layer's `biases` list (biases the compression added) names them
SHORT = ["q", "k", "v", "o", "gate", "up", "down"]


class FactoredLinear(nn.Module):
    """y = A (B x) (+ bias) with B [rank, in] and A [out, rank]."""

    def __init__(self, in_features, out_features, rank, bias):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.factor_b = nn.Linear(in_features, rank, bias=False)
        self.factor_a = nn.Linear(rank, out_features, bias=False)
        # the bias keeps the dense linear's name (`...q_proj.bias`), as stored
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x):
        y = self.factor_a(self.factor_b(x))
        return y if self.bias is None else y + self.bias


def core_shapes(shape):
    """[left, row factor, column factor, right] of every core of an MPO shape."""
    rows, cols, bonds = shape["row_factors"], shape["col_factors"], shape["bonds"]
    n = len(rows)
    return [[1 if k == 0 else bonds[k - 1], rows[k], cols[k], 1 if k == n - 1 else bonds[k]] for k in range(n)]


class MpoLinear(nn.Module):
    """A matrix stored as a chain of MPO cores; a shared centre lives in `holder`."""

    def __init__(self, shape, bias, holder=None):
        super().__init__()
        self.shapes = core_shapes(shape)
        self.centre = len(self.shapes) // 2 if shape.get("shared_centre") else None
        self.out_features = 1
        self.in_features = 1
        for k, s in enumerate(self.shapes):
            self.out_features *= s[1]
            self.in_features *= s[2]
            if k != self.centre:
                self.register_parameter(f"mpo_core_{k}", nn.Parameter(torch.empty(s)))
        # a plain list, so the shared core is not registered (and counted) once per layer
        self._holder = [holder] if holder is not None else []
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None

    def core(self, k):
        if k == self.centre:
            return getattr(self._holder[0], f"mpo_core_{k}")
        return getattr(self, f"mpo_core_{k}")

    def weight(self):
        # contract the bonds: [i0, j0, i1, j1, ..., in, jn], then rows (i0..in, i0 most
        # significant) before columns (j0..jn): the layout lorap-gpu contracts them to
        t = self.core(0)[0]
        for k in range(1, len(self.shapes)):
            t = torch.tensordot(t, self.core(k), dims=([t.dim() - 1], [0]))
        t = t[..., 0]
        n = len(self.shapes)
        t = t.permute(*range(0, 2 * n, 2), *range(1, 2 * n, 2))
        return t.reshape(self.out_features, self.in_features)

    def forward(self, x):
        return nn.functional.linear(x, self.weight().to(x.dtype), self.bias)


class LorapForCausalLM(LlamaForCausalLM):
    config_class = LorapConfig

    def __init__(self, config):
        super().__init__(config)
        section = config.lorap
        qkv_bias = bool(getattr(config, "lorap_qkv_bias", False))
        # folders written before `lorap_own_biases` name only qwen2's q/k/v biases
        own_biases = getattr(config, "lorap_own_biases", None) or (["q", "k", "v"] if qkv_bias else [])
        d, hd = config.hidden_size, config.head_dim
        qd, kvd = config.num_attention_heads * hd, config.num_key_value_heads * hd
        holders = self._shared_holders(section["layers"])
        for i, plan in enumerate(section["layers"]):
            layer = self.model.layers[i]
            f = plan["ffn_width"]
            shapes = [(qd, d), (kvd, d), (kvd, d), (d, qd), (f, d), (f, d), (d, f)]
            mpo = plan.get("mpo") or {}
            for j, name in enumerate(LINEARS):
                out_f, in_f = shapes[j]
                bias = SHORT[j] in own_biases or SHORT[j] in (plan.get("biases") or [])
                if name in mpo:
                    lin = MpoLinear(mpo[name], bias, holders.get(name))
                elif plan.get(RANK_KEYS[j]) is not None:
                    lin = FactoredLinear(in_f, out_f, plan[RANK_KEYS[j]], bias)
                else:
                    lin = nn.Linear(in_f, out_f, bias=bias)
                parent, attr = name.split(".")
                setattr(getattr(layer, parent), attr, lin)
            layer.mlp.intermediate_size = f
        self.post_init()

    def _shared_holders(self, layers):
        """`model.mpo_shared.{linear}` modules holding the centres shared by all layers."""
        holders = {}
        for plan in layers:
            for name, shape in (plan.get("mpo") or {}).items():
                if not shape.get("shared_centre") or name in holders:
                    continue
                if not hasattr(self.model, "mpo_shared"):
                    self.model.mpo_shared = nn.Module()
                node = self.model.mpo_shared
                for part in name.split("."):
                    if not hasattr(node, part):
                        setattr(node, part, nn.Module())
                    node = getattr(node, part)
                c = len(shape["row_factors"]) // 2
                node.register_parameter(f"mpo_core_{c}", nn.Parameter(torch.empty(core_shapes(shape)[c])))
                holders[name] = node
        return holders
