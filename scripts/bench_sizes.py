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

from lorakit.lora import count_parameters
from lorakit.paper_models import PAPER_LORA, PAPER_MODELS, paper_model

QUICK_MODELS = ("roberta-base", "gpt2-medium")


def _heads(name: str) -> tuple[str, ...]:
    """The 3-label MNLI head lorakit trains beside the adapter (none for GPT-2's LM head)."""
    from lorakit.families import seq_cls_heads

    model_type = PAPER_MODELS[name][0]
    return () if model_type == "gpt2" else tuple(seq_cls_heads(model_type))


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
    fp32 model's size, for one of the paper's models (``PAPER_MODELS``)."""
    from lorakit.families import lora_defaults
    from lorakit.lora import LoraConfig, inject_lora, mark_trainable
    from lorakit.lora.inject import adapter_parameter_names

    r, paper = PAPER_LORA[name]
    heads = _heads(name)
    with torch.device("meta"):
        model = paper_model(name, num_labels=3)
    model_params = count_parameters(model).total  # tied weights (GPT-2's embedding and LM head) once
    # Targets: the paper's, by model type (GPT-2's q and v slices of c_attn).
    config = lora_defaults(model, LoraConfig(r=r, alpha=2.0 * r, modules_to_save=heads))
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
    names = QUICK_MODELS if quick else tuple(PAPER_MODELS)
    return {"models": [adapter_size(n) for n in names]}
