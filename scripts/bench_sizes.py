"""Adapter size against model size, for the paper's models and ranks.

Models are built on PyTorch's meta device from their configs (no weights exist, none are read); only
the adapter's tensors are then given real storage, and ``save_adapter`` writes them, so the bytes are
exactly what lorakit writes, safetensors header and adapter_config.json included.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

_ROBERTA = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=3)
_DEBERTA_XXL = dict(
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
    num_labels=3,
)

# name -> (config class, model class, config keys, r, the paper's trainable-parameter figure, heads)
MODELS: dict[str, tuple[str, str, dict[str, Any], int, str, tuple[str, ...]]] = {
    "roberta-base": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        dict(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, **_ROBERTA
        ),
        8,
        "0.3M",
        ("classifier",),
    ),
    "roberta-large": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        dict(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, **_ROBERTA
        ),
        8,
        "0.8M",
        ("classifier",),
    ),
    "deberta-v2-xxlarge": (
        "DebertaV2Config",
        "DebertaV2ForSequenceClassification",
        _DEBERTA_XXL,
        16,
        "4.7M",
        ("classifier", "pooler"),
    ),
    "gpt2-medium": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=1024, n_layer=24, n_head=16),
        4,
        "0.35M",
        (),
    ),
}
QUICK_MODELS = ("roberta-base", "gpt2-medium")


def _meta_model(config_cls: str, model_cls: str, keys: dict[str, Any]) -> nn.Module:
    import transformers

    config = getattr(transformers, config_cls)(**keys)
    with torch.device("meta"):
        return getattr(transformers, model_cls)(config)


def _materialize(model: nn.Module, names: list[str]) -> None:
    """Give the named (meta) parameters real zero-filled storage on the CPU; the rest stays meta."""
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(torch.zeros(old.shape, dtype=old.dtype), old.requires_grad)


def _saved_bytes(model: nn.Module, config: Any, task_type: str) -> int:
    from lorakit.lora import save_adapter

    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        out = save_adapter(model, Path(tmp) / "adapter", config, task_type=task_type)
        return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def adapter_size(name: str) -> dict[str, Any]:
    """LoRA and head parameter counts, adapter bytes on disk (with and without the task head) and the
    fp32 model's size, for one of ``MODELS``."""
    from lorakit.lora import LoraConfig, count_parameters, inject_lora, mark_trainable
    from lorakit.lora.inject import adapter_parameter_names

    config_cls, model_cls, keys, r, paper, heads = MODELS[name]
    model = _meta_model(config_cls, model_cls, keys)
    seen: set[int] = set()
    model_params = 0
    for p in model.parameters():  # tied weights (GPT-2's embedding and LM head) once
        if id(p) not in seen:
            seen.add(id(p))
            model_params += p.numel()
    config = LoraConfig(r=r, alpha=2.0 * r, modules_to_save=heads)  # targets: the paper's, by model type
    inject_lora(model, config)
    mark_trainable(model, "none", heads)
    names = adapter_parameter_names(model, "none", heads)
    _materialize(model, names)
    counts = count_parameters(model)
    task_type = "CAUSAL_LM" if not heads else "SEQ_CLS"
    with_head = _saved_bytes(model, config, task_type)
    lora_only_config = LoraConfig(r=r, alpha=2.0 * r, target_modules=config.target_modules)
    lora_only = _saved_bytes(model, lora_only_config, task_type) if heads else with_head
    model_bytes = 4 * model_params  # fp32 weights; a safetensors header adds a few kB
    return {
        "model": name,
        "r": r,
        "targets": "query, value",
        "lora_params": counts.lora,
        "paper_lora_params": paper,
        "head_params": counts.trainable - counts.lora,
        "model_params": model_params,
        "adapter_bytes_lora_only": lora_only,
        "adapter_bytes_with_head": with_head,
        "model_bytes_fp32": model_bytes,
        "lora_only_fraction_of_model": lora_only / model_bytes,
    }


def adapter_size_section(quick: bool) -> dict[str, Any]:
    """Sizes for all the paper's models (quick: RoBERTa-base and GPT-2 medium)."""
    names = QUICK_MODELS if quick else tuple(MODELS)
    return {"models": [adapter_size(n) for n in names]}
