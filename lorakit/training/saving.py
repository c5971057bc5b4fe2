"""What training saves as its result: a LoRA adapter in PEFT's format or, for full fine-tuning, the whole
model with its tokenizer (resumable checkpoints are ``lorakit.training.checkpoint``'s)."""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from lorakit.lora import save_adapter
from lorakit.models import PreparedModel, head_metadata
from lorakit.recipe import Recipe
from lorakit.tasks.base import Task


def _task_type(task: Task) -> str:
    return "CAUSAL_LM" if task.kind == "generation" else "SEQ_CLS"


def save_trained(
    prepared: PreparedModel, model: nn.Module, recipe: Recipe, task: Task, out_dir: Path
) -> None:
    """The LoRA adapter in PEFT's format or, for full fine-tuning, the whole model with its tokenizer."""
    if prepared.lora_config is not None:
        save_adapter(
            model,
            out_dir,
            prepared.lora_config,
            recipe.model.name_or_path,
            _task_type(task),
            metadata=head_metadata(task, recipe.model.quantize),
        )
        return
    target = out_dir / "model"
    tmp = out_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    prepared.tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
