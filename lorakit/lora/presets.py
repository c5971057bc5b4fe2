"""The paper's per-architecture choices, keyed by Hugging Face ``config.model_type``.

Plain data (no transformers import), so the core stays torch-only: which modules hold W_q and W_v,
which projections are fused, and which freshly initialised modules form a sequence-classification head.
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
}

# Fused projections: module-name suffix -> names of its equal output slices, in order.
FUSED_SLICES: Mapping[str, Mapping[str, Sequence[str]]] = {
    "gpt2": {"c_attn": ("q", "k", "v")},
}

# The sequence-classification head: trained and saved with the adapter. RoBERTa's ``classifier`` is a
# dense + tanh layer on the first token followed by the output projection, the head the paper trains.
# BERT splits the same two layers into ``pooler`` and ``classifier``; its pooler comes from next-sentence
# prediction, which later BERT-family checkpoints (sentence-transformers' MiniLM among them) never
# trained, so it trains with the classifier, as RoBERTa's dense layer does. DeBERTa-v2's ContextPooler
# is not in the pretrained checkpoints at all: it belongs with the head too.
SEQ_CLS_HEADS: Mapping[str, Sequence[str]] = {
    "roberta": ("classifier",),
    "xlm-roberta": ("classifier",),
    "bert": ("classifier", "pooler"),
    "electra": ("classifier",),
    "deberta-v2": ("classifier", "pooler"),
    "deberta": ("classifier", "pooler"),
    "gpt2": ("score",),
}


def paper_targets(model_type: str) -> list[str]:
    """The paper's target modules for an architecture; KeyError lists the known ones."""
    try:
        return list(PAPER_TARGETS[model_type])
    except KeyError:
        raise KeyError(
            f"no default LoRA targets for model type {model_type!r} (known: {', '.join(PAPER_TARGETS)}); "
            "set lora.target_modules"
        ) from None


def fused_slices(model_type: str) -> dict[str, tuple[str, ...]]:
    """Fused projections of an architecture (empty when it has none)."""
    return {k: tuple(v) for k, v in FUSED_SLICES.get(model_type, {}).items()}


def seq_cls_heads(model_type: str) -> list[str]:
    """Head modules of a sequence-classification model of this architecture."""
    return list(SEQ_CLS_HEADS.get(model_type, ("classifier", "score")))
