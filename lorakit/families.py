"""Model-family knowledge that needs a model's config: the row layout of fused q|k|v projections.

The LoRA core (``lorakit.lora``) knows each family's module names as plain data keyed by
``config.model_type`` (``lorakit.lora.presets``), but not the sizes of a fused projection's slices: under
grouped-query attention they follow from the head counts of the checkpoint at hand (Phi-3-mini's
``qkv_proj`` is 3072 | 3072 | 3072, Phi-3-medium's 5120 | 1280 | 1280). This module reads them from a
Hugging Face config by attribute (no transformers import) and hands the core plain data:
``LoraConfig.fused_slices = {"qkv_proj": (("q", 5120), ("k", 1280), ("v", 1280))}``.

Only contiguous layouts are described: q's rows, then k's, then v's, each block whole. A projection that
interleaves q, k and v per head (GPT-NeoX, Falcon, BLOOM; GPT-BigCode without multi-query) has no rows
that are "the q slice", so it gets no slices here, and ``layout_problem`` says why a preset cannot apply.
Every rule was checked against the installed transformers' attention code and on tiny models
(tests/test_fused_families.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lorakit.lora.config import SliceLayout

# Callers read a HF PretrainedConfig; any object with the attributes will do.
HfConfig = Any


def _head_dim(config: HfConfig) -> int:
    # As the models compute it: an explicit head_dim (Phi-3 may set one) wins over hidden / heads.
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _gpt2(config: HfConfig) -> dict[str, SliceLayout]:
    # Conv1D(3 · n_embd, n_embd), split with .split(n_embd) in GPT2Attention: equal thirds.
    d = int(config.n_embd)
    return {"c_attn": (("q", d), ("k", d), ("v", d))}


def _phi3(config: HfConfig) -> dict[str, SliceLayout]:
    # Phi3Attention: query_pos = num_attention_heads · head_dim, then num_key_value_heads · head_dim each.
    head = _head_dim(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    q, kv = int(config.num_attention_heads) * head, int(kv_heads) * head
    return {"qkv_proj": (("q", q), ("k", kv), ("v", kv))}


def _gpt_bigcode(config: HfConfig) -> dict[str, SliceLayout]:
    # GPTBigCodeAttention with multi_query: c_attn(x).split((embed_dim, kv_dim, kv_dim)), one k/v head.
    # Without it, c_attn(x).view(..., num_heads, 3 · head_dim): q, k, v interleaved per head.
    if not getattr(config, "multi_query", True):
        return {}
    hidden = int(config.n_embd)
    head = hidden // int(config.n_head)
    return {"c_attn": (("q", hidden), ("k", head), ("v", head))}


def _modernbert(config: HfConfig) -> dict[str, SliceLayout]:
    # ModernBertAttention: Wqkv(x).view(..., 3, -1, head_dim): q, k, v each num_heads · head_dim rows.
    d = int(config.hidden_size) // int(config.num_attention_heads) * int(config.num_attention_heads)
    return {"Wqkv": (("q", d), ("k", d), ("v", d))}


_RULES: dict[str, Callable[[HfConfig], dict[str, SliceLayout]]] = {
    "gpt2": _gpt2,
    "phi3": _phi3,
    "gpt_bigcode": _gpt_bigcode,
    "modernbert": _modernbert,
}
# Fused q|k|v projections laid out per head: why no slice of them can be adapted alone.
_INTERLEAVED = {
    "gpt_neox": "query_key_value interleaves q, k and v per head",
    "falcon": "query_key_value interleaves q, k and v per head (or per key/value group)",
    "bloom": "query_key_value interleaves q, k and v per head",
}


def fused_slices(config: HfConfig) -> dict[str, SliceLayout]:
    """The contiguous fused projections of a model with this config: module-name suffix -> (name, rows)
    per slice, in order. Empty for families without one, and for per-head layouts."""
    rule = _RULES.get(getattr(config, "model_type", None) or "")
    return rule(config) if rule is not None else {}


def layout_problem(config: HfConfig) -> str | None:
    """Why this config's fused q|k|v cannot be adapted per slice (None when it can, or has none)."""
    model_type = getattr(config, "model_type", None) or ""
    if model_type == "gpt_bigcode" and not getattr(config, "multi_query", True):
        return "gpt_bigcode with multi_query: false interleaves q, k and v per head in c_attn"
    reason = _INTERLEAVED.get(model_type)
    return f"{model_type}'s {reason}" if reason else None
