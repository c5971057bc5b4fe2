"""FSDP under ``train.distributed``: whole files from a model whose parameters are sharded across GPUs.

Accelerate runs FSDP on CUDA devices only, so this path is checked by ``scripts/gpu_check.sh`` on a GPU
machine, not by the CPU test suite (the DeepSpeed path, ``lorakit.training.zero``, is tested on CPUs).

- The adapter: ``accelerator.get_state_dict`` (a collective; FULL_STATE_DICT gives whole tensors under
  their plain names on the main process). lorakit's adapter writer reads the model's own modules, so for
  the moment of saving the main process puts those whole values into the trainable parameters and looks
  past FSDP's wrapper modules, whose names would otherwise appear in every key of the file.
- A checkpoint's Adam state: ``FSDP.optim_state_dict`` (whole, keyed by parameter name), re-keyed to
  ``torch.optim.AdamW.state_dict()``'s indices, the layout every lorakit checkpoint has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

_WRAPPED = "_fsdp_wrapped_module"


def uses_fsdp(accelerator: Accelerator) -> bool:
    """Whether FSDP holds the model."""
    return accelerator.distributed_type == DistributedType.FSDP


@contextlib.contextmanager
def _past_wrappers(model: nn.Module) -> Iterator[None]:
    """Inside, each FSDP wrapper in ``model`` is replaced by the module it wraps (names lose FSDP's part)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, _WRAPPED):
                swapped.append((parent, name, child))
    try:
        for parent, name, child in swapped:
            parent._modules[name] = getattr(child, _WRAPPED)
        yield
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


@contextlib.contextmanager
def _holding(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside, each trainable parameter of ``model`` holds its value from ``values``."""
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for name, param in model.named_parameters():
            if param.requires_grad:
                saved.append((param, param.data))
                param.data = values[name].to(param.device)
        yield
    finally:
        for param, data in saved:
            param.data = data


@contextlib.contextmanager
def whole_trainables(accelerator: Accelerator, wrapped: nn.Module, model: nn.Module) -> Iterator[None]:
    """Inside, on the main process, ``model`` (the unwrapped model) shows plain names and whole trainable
    values. Every process must enter it (gathering is a collective)."""
    full = accelerator.get_state_dict(wrapped)
    if not accelerator.is_main_process:
        yield
        return
    with _past_wrappers(model), _holding(model, full):
        yield


def optimizer_state(
    accelerator: Accelerator, wrapped: nn.Module, optimizer: torch.optim.Optimizer, layout: list[list[str]]
) -> dict[str, Any]:
    """The whole Adam state in ``torch.optim.AdamW.state_dict()``'s layout (on the main process). A
    collective."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    by_name = FSDP.optim_state_dict(wrapped, optimizer)
    if not accelerator.is_main_process:
        return {}
    index = {name: i for i, name in enumerate(n for names in layout for n in names)}
    state = {index[name]: value for name, value in by_name["state"].items()}
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [index[n] for n in group["params"]]}
        for group in by_name["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(
    wrapped: nn.Module, optimizer: torch.optim.Optimizer, layout: list[list[str]], saved: dict[str, Any]
) -> None:
    """Put a checkpoint's Adam state (torch's layout) into FSDP's sharded optimizer. Every process calls
    it with the same values."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    names = [n for group in layout for n in group]
    by_name = {
        "state": {names[i]: value for i, value in saved["state"].items()},
        "param_groups": [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
            for g in saved["param_groups"]
        ],
    }
    optimizer.load_state_dict(FSDP.optim_state_dict_to_load(wrapped, optimizer, by_name))


def load_weights(wrapped: nn.Module, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's whole trainable weights into FSDP's shards. Every process calls it."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(wrapped, writeback=True), _past_wrappers(model), torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value)
