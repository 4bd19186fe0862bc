"""The perplexity protocol of `lorap-gpu eval`, shared by the interop checks: the text is
tokenized whole with the model's tokenizer.json (no special tokens, no BOS, truncation and
padding off), cut into non-overlapping windows of L tokens (a shorter tail dropped), and
every token but each window's first is scored."""

import json
import math

from tokenizers import Tokenizer


def token_windows(model_dir, text_path, seq_len, max_tokens):
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    tok.no_truncation()
    tok.no_padding()
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    ids = tok.encode(text, add_special_tokens=False).ids
    n = min(max_tokens or len(ids), len(ids)) // seq_len * seq_len
    return [ids[i : i + seq_len] for i in range(0, n, seq_len)]


def summary(window_nll, **extra):
    """window_nll: per window, the list of the scored tokens' NLLs."""
    flat = [x for w in window_nll for x in w]
    mean = sum(flat) / len(flat)
    out = {
        "windows": len(window_nll),
        "scored_tokens": len(flat),
        "mean_nll": mean,
        "perplexity": math.exp(mean),
        "window_mean_nll": [sum(w) / len(w) for w in window_nll],
    }
    out.update(extra)
    return out


def emit(result):
    print(json.dumps(result, indent=1))
