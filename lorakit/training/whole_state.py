"""Whole training state whatever holds the model: one process or DDP (parameters whole on every process),
DeepSpeed ZeRO (``lorakit.training.zero``) or FSDP (``lorakit.training.fsdp``). The loop saves adapters
and checkpoints through these functions only, so every file lorakit writes has one layout: whole tensors
under plain names, Adam's state as ``torch.optim.AdamW.state_dict()`` gives it.

Each function is a collective where the model is sharded: every process calls it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from lorakit.training import fsdp, zero
from lorakit.training.checkpoint import Checkpoint, load_weights, trainable_state


@contextlib.contextmanager
def whole_trainables(accelerator: Accelerator, wrapped: nn.Module, model: nn.Module) -> Iterator[None]:
    """Inside, the main process's ``model`` (unwrapped) holds whole trainable values under plain names."""
    if zero.uses_deepspeed(accelerator):
        with zero.whole_trainables(accelerator, model):
            yield
    elif fsdp.uses_fsdp(accelerator):
        with fsdp.whole_trainables(accelerator, wrapped, model):
            yield
    else:
        yield


def checkpoint_state(
    accelerator: Accelerator,
    wrapped: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: list[list[str]],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable weights and the optimizer's state dict, whole (complete on the main process)."""
    if zero.uses_deepspeed(accelerator):
        return zero.trainable_state(accelerator, model), zero.optimizer_state(accelerator, model, layout)
    if fsdp.uses_fsdp(accelerator):
        with fsdp.whole_trainables(accelerator, wrapped, model):
            weights = trainable_state(model) if accelerator.is_main_process else {}
        return weights, fsdp.optimizer_state(accelerator, wrapped, optimizer.optimizer, layout)
    if not accelerator.is_main_process:  # DDP's copies are the main process's: only it writes
        return {}, {}
    return trainable_state(model), optimizer.state_dict()


def restore_state(
    accelerator: Accelerator,
    wrapped: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: list[list[str]],
    path: Path,
    saved: Checkpoint,
) -> None:
    """Put a checkpoint's weights and optimizer state back, into shards where the model is sharded."""
    if zero.uses_deepspeed(accelerator):
        zero.load_state(accelerator, model, layout, saved.weights, saved.optimizer)
    elif fsdp.uses_fsdp(accelerator):
        fsdp.load_weights(wrapped, model, saved.weights)
        fsdp.load_optimizer_state(wrapped, optimizer.optimizer, layout, saved.optimizer)
    else:
        load_weights(path, model, saved.weights)
        optimizer.load_state_dict(saved.optimizer)
