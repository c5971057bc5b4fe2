"""The shapes of the paper's models, for figures that need only a config (no weights, no hub):
``lorakit info``-style parameter counts, adapter sizes, memory estimates, and the benchmarks' models
(random weights: the values do not change a step's cost). ``FAMILY_MODELS`` adds shapes of families the
paper predates, built the same way, for the benchmarks only."""

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

# Modern decoders the paper predates (issue 24), kept apart from PAPER_MODELS, whose four the sizes
# benchmark and `lorakit info`'s tests walk. name -> (model_type, config keys), as above.
FAMILY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    # The Llama architecture at ~350M parameters (348,701,696, untied): hidden 1024, 24 layers, 16 query
    # heads of 64 over 8 key/value heads (grouped-query attention, 2 query heads a group), a SwiGLU MLP
    # 2816 wide, RMSNorm, rotary positions, Llama 2's 32,000-token vocabulary, and input embedding and
    # output head untied, as Llama 2's (65.5M of the 348.7M). Tied it would be 315.9M.
    "llama-350m": (
        "llama",
        dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=8,
            intermediate_size=2816,
            vocab_size=32000,
            tie_word_embeddings=False,
        ),
    ),
}
# Every shape paper_config and paper_model build; the decoders among them are built as causal LMs.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {**PAPER_MODELS, **FAMILY_MODELS}
DECODERS = frozenset({"gpt2", "llama"})


def save_paper_config(name: str, out_dir: str | Path) -> Path:
    """Write ``config.json`` (and nothing else) for the paper model ``name`` into ``out_dir``."""
    paper_config(name).save_pretrained(out_dir)
    return Path(out_dir)


# name -> (r, the paper's trainable-parameter figure): the rank each model is adapted with in the paper
# (query and value), and the count its tables print.
PAPER_LORA: dict[str, tuple[int, str]] = {
    "roberta-base": (8, "0.3M"),
    "roberta-large": (8, "0.8M"),
    "deberta-v2-xxlarge": (16, "4.7M"),
    "gpt2-medium": (4, "0.35M"),
}


def paper_config(name: str, **overrides: Any) -> Any:
    """The transformers config of the paper model (or ``FAMILY_MODELS`` shape) ``name``, with
    ``overrides`` (``num_labels``, or a narrower shape for a stand-in) applied."""
    from transformers import AutoConfig

    model_type, keys = MODELS[name]
    return AutoConfig.for_model(model_type, **{**keys, **overrides})


def paper_model(name: str, **overrides: Any) -> Any:
    """The model ``name`` with random weights (``paper_config``): a sequence classifier for the
    encoders, a causal LM for the decoders (GPT-2, Llama). Built under ``torch.device("meta")`` it holds
    no storage at all."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = paper_config(name, **overrides)
    auto = AutoModelForCausalLM if config.model_type in DECODERS else AutoModelForSequenceClassification
    return auto.from_config(config)
