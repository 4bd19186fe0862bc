"""Configuration of a model compressed by lorap-gpu (written by `lorap-gpu export --format hf`).

A LLaMA configuration plus the `lorap` section that says how each kept decoder layer stores
its seven linears (factor-pair ranks, MPO shapes, the kept FFN width). Loaded through
transformers' custom-code path: AutoConfig.from_pretrained(DIR, trust_remote_code=True).
"""

from transformers import LlamaConfig


class LorapConfig(LlamaConfig):
    # its own model type, so that loading without trust_remote_code fails loudly instead of
    # building a dense LLaMA that the stored factor pairs do not fit
    model_type = "lorap"
