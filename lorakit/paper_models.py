"""The shapes of the paper's models, for figures that need only a config (no weights, no hub):
``lorakit info``-style parameter counts, adapter sizes, memory estimates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_ROBERTA = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1)

# name -> (Hugging Face model_type, config keys): the published configs' architecture fields.
PAPER_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "roberta-base": (
        "roberta",
        dict(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, **_ROBERTA
        ),
    ),
    "roberta-large": (
        "roberta",
        dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, **_ROBERTA
        ),
    ),
    "deberta-v2-xxlarge": (
        "deberta-v2",
        dict(
            hidden_size=1536,
            num_hidden_layers=48,
            num_attention_heads=24,
            intermediate_size=6144,
            vocab_size=128100,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_buckets=256,
            max_relative_positions=-1,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            position_biased_input=False,
        ),
    ),
    "gpt2-medium": ("gpt2", dict(n_embd=1024, n_layer=24, n_head=16)),
}


def save_paper_config(name: str, out_dir: str | Path) -> Path:
    """Write ``config.json`` (and nothing else) for the paper model ``name`` into ``out_dir``."""
    from transformers import AutoConfig

    model_type, keys = PAPER_MODELS[name]
    AutoConfig.for_model(model_type, **keys).save_pretrained(out_dir)
    return Path(out_dir)
