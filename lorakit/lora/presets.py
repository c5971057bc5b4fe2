"""The paper's per-architecture choices, keyed by Hugging Face ``config.model_type``.

Plain data (no transformers import), so the core stays torch-only: which modules hold W_q and W_v,
which projections are fused, and which freshly initialised modules form a sequence-classification head.
Every module name was checked against the installed transformers by building each family's tiny model
(tests/test_families.py, tests/test_fused_families.py). A family that fuses q|k|v into one projection gets
a preset only when its q, k and v are contiguous row blocks (``FUSED_SLICES``): adapting the whole fused
module would silently adapt W_k too, which is not the paper's choice. Where the blocks' sizes depend on the
model's config (grouped-query attention), the core cannot know them: ``lorakit.families`` computes them from
the Hugging Face config and hands them over in ``LoraConfig.fused_slices``. Families that interleave q, k
and v per head (GPT-NeoX, Falcon, BLOOM) have no preset, and slice targets on them are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# LoRA paper, section 4/7: adapt the attention query and value projections only.
PAPER_TARGETS: Mapping[str, Sequence[str]] = {
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "bert": ("query", "value"),
    "electra": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
    "deberta": ("in_proj",),  # DeBERTa v1 fuses q|k|v in one in_proj; adapting it whole is the fallback
    "gpt2": ("c_attn[q,v]",),
    "distilbert": ("q_lin", "v_lin"),
    # Decoders with separate projections (Llama's naming, which the others copied). Phi keeps q/k/v apart
    # too (its output projection is ``dense``); OPT's attention is BART's (``out_proj``).
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    # Fused q|k|v in contiguous blocks: the q and v slices, as GPT-2's. GPT-BigCode's only with
    # multi_query (its default, StarCoder's); lorakit.families refuses the per-head layout otherwise.
    "phi3": ("qkv_proj[q,v]",),
    "gpt_bigcode": ("c_attn[q,v]",),
    "modernbert": ("Wqkv[q,v]",),
}

# Fused projections: module-name suffix -> names of its contiguous output slices, in order. Equal
# slices for GPT-2 (3 × n_embd) and ModernBERT (3 × hidden) whatever the config.
FUSED_SLICES: Mapping[str, Mapping[str, Sequence[str]]] = {
    "gpt2": {"c_attn": ("q", "k", "v")},
    "modernbert": {"Wqkv": ("q", "k", "v")},
    "phi3": {"qkv_proj": ("q", "k", "v")},
    "gpt_bigcode": {"c_attn": ("q", "k", "v")},
}
# Families whose slices differ in size by config (k and v narrower than q under grouped- or multi-query
# attention): names alone would read as equal slices and cut the wrong rows, so the core refuses to slice
# them until sizes are given (``lorakit.families`` derives them from the model's config).
SIZED_BY_CONFIG = frozenset({"phi3", "gpt_bigcode"})
# Fused projections that interleave q, k and v per head (module suffix): no row block is "the q slice".
INTERLEAVED: Mapping[str, str] = {
    "gpt_neox": "query_key_value",
    "falcon": "query_key_value",
    "bloom": "query_key_value",
}

# The sequence-classification head: trained and saved with the adapter. RoBERTa's ``classifier`` is a
# dense + tanh layer on the first token followed by the output projection, the head the paper trains.
# BERT splits the same two layers into ``pooler`` and ``classifier``; its pooler comes from next-sentence
# prediction, which later BERT-family checkpoints (sentence-transformers' MiniLM among them) never
# trained, so it trains with the classifier, as RoBERTa's dense layer does. DeBERTa-v2's ContextPooler
# is not in the pretrained checkpoints at all: it belongs with the head too. DistilBERT's pre_classifier is
# the same dense layer, absent from its masked-LM checkpoints. The decoders' classifiers read the last
# non-pad token's state through one bias-free ``score`` projection, fresh in every causal-LM checkpoint.
SEQ_CLS_HEADS: Mapping[str, Sequence[str]] = {
    "roberta": ("classifier",),
    "xlm-roberta": ("classifier",),
    "bert": ("classifier", "pooler"),
    "electra": ("classifier",),
    "deberta-v2": ("classifier", "pooler"),
    "deberta": ("classifier", "pooler"),
    "gpt2": ("score",),
    "distilbert": ("pre_classifier", "classifier"),
    "llama": ("score",),
    "mistral": ("score",),
    "qwen2": ("score",),
    "qwen3": ("score",),
    "gemma": ("score",),
    "gemma2": ("score",),
    "gemma3_text": ("score",),
    "phi": ("score",),
    "opt": ("score",),
    "phi3": ("score",),
    "gpt_bigcode": ("score",),
    # ModernBERT pools through ``head`` (dense, activation, norm) into ``classifier``; ``head`` is the
    # masked-LM checkpoint's own transform, retrained here as BERT's pooler is.
    "modernbert": ("head", "classifier"),
}


def paper_targets(model_type: str) -> list[str]:
    """The paper's target modules for an architecture; KeyError says how to choose them instead."""
    try:
        return list(PAPER_TARGETS[model_type])
    except KeyError:
        # One line that a recipe author can act on: the three forms ``target_modules`` accepts.
        raise KeyError(
            f"no default LoRA targets for model type {model_type!r}; set lora.target_modules, "
            "e.g. [q_proj, v_proj] (module names), a regular expression, or all-linear"
        ) from None


def fused_slices(model_type: str) -> dict[str, tuple[str, ...]]:
    """Fused projections of an architecture whose slices are equal whatever its config (empty when it has
    none, or when their sizes come from the config: ``SIZED_BY_CONFIG``)."""
    if model_type in SIZED_BY_CONFIG:
        return {}
    return {k: tuple(v) for k, v in FUSED_SLICES.get(model_type, {}).items()}


def seq_cls_heads(model_type: str) -> list[str]:
    """Head modules of a sequence-classification model of this architecture."""
    return list(SEQ_CLS_HEADS.get(model_type, ("classifier", "score")))
