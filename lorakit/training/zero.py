"""DeepSpeed ZeRO under ``train.distributed``: what lorakit does differently when DeepSpeed holds the model.

ZeRO splits training state across processes: stage 2 the optimizer state and gradients, stage 3 the
parameters too, so a process's own tensors are shards (stage 3: empty placeholders). lorakit's files must
not depend on that split, so everything written here is whole and in the layout a one-process run writes:

- The adapter is saved inside ``whole_trainables``: DeepSpeed's ``GatheredParameters`` over the trainable
  parameters only, a collective every process enters. The frozen base is never gathered for a few-MB
  adapter (``accelerator.get_state_dict`` would gather all of it onto one process).
- A checkpoint holds the full fp32 master weights and the full Adam state of each trainable parameter, in
  ``torch.optim.AdamW.state_dict()``'s own layout (DeepSpeed's tensor-fragment API gathers them), so a
  checkpoint written under ZeRO resumes on one process without DeepSpeed and the other way round, and
  nothing DeepSpeed-specific (its loss scaler objects, partition layouts) is stored.

On a machine without a GPU, DeepSpeed's processes talk over gloo; Accelerate would otherwise ask for
DeepSpeed's own default backend there and see one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, KwargsHandler
from torch import nn

from lorakit.recipe.schema import TrainSection


def process_group_kwargs() -> list[KwargsHandler]:
    """Accelerator kwargs handlers: gloo for DeepSpeed processes on a machine without CUDA."""
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
    if deepspeed and not torch.cuda.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def uses_deepspeed(accelerator: Accelerator) -> bool:
    """Whether DeepSpeed holds the model."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


@contextlib.contextmanager
def whole_model_loading(accelerator: Accelerator) -> Iterator[None]:
    """Inside, transformers loads models whole even under ZeRO-3: LoRA layers are built around each target's
    full weight, and DeepSpeed partitions the adapted model at ``accelerator.prepare``. (transformers
    otherwise loads under ``deepspeed.zero.Init`` whenever a ZeRO-3 config is registered, whatever
    Accelerate's ``zero3_init_flag`` says.) The registration comes back on exit, for generation to keep
    the processes in step."""
    if not uses_deepspeed(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def _zero_stage(accelerator: Accelerator) -> int:
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    return int(config.get("zero_optimization", {}).get("stage", 0))


def configure(accelerator: Accelerator, train: TrainSection) -> None:
    """Set DeepSpeed's training settings from the recipe before ``accelerator.prepare``: the per-process
    micro batch, gradient accumulation and clipping (DeepSpeed clips by itself, at 1.0 unless told; the
    loop's own clipping is a no-op under DeepSpeed), so the recipe means the same with or without it."""
    if not uses_deepspeed(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    # Accelerate reads "auto" off the dataloader's batch_size, which a batch sampler leaves unset.
    config["train_micro_batch_size_per_gpu"] = train.batch_size
    config["gradient_accumulation_steps"] = train.grad_accum
    config["gradient_clipping"] = float(train.max_grad_norm or 0.0)
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the process count


def _engine_optimizers(accelerator: Accelerator) -> tuple[Any, torch.optim.Optimizer]:
    """DeepSpeed's ZeRO optimizer and the torch optimizer it steps over its flat fp32 partitions."""
    zero = accelerator.deepspeed_engine_wrapped.engine.optimizer
    return zero, zero.optimizer


def _flat_partitions(zero: Any) -> list[torch.Tensor]:
    """This process's flat fp32 partitions, one per parameter group: the tensors torch's optimizer steps
    and keys its state by. (ZeRO-3 takes them out of the optimizer's groups between steps.)"""
    flats = getattr(zero, "fp32_partitioned_groups_flat", None)
    return list(flats if flats is not None else zero.single_partition_of_fp32_groups)


def _link_optimizer_state(zero: Any, base: torch.optim.Optimizer) -> None:
    """Point each parameter's fragment map at its slice of Adam's state (ZeRO 1 and 2; stage 3 reads the
    state directly). DeepSpeed 0.19 links them once, right after the first group's first step, when the
    later groups have no state yet, so the no-decay group's fragments stay empty; and before any step
    there is nothing to link. Linking again is idempotent."""
    flats = getattr(zero, "single_partition_of_fp32_groups", None)
    if flats is None:
        return
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    for params, flat in zip(zero.bit16_groups, flats, strict=True):
        if base.state.get(flat):
            lazy_init_hp_params_optimizer_state(params, flat, base.state)


def _trainables(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def whole_trainables(accelerator: Accelerator, model: nn.Module) -> Iterator[None]:
    """Inside, every process's trainable parameters hold their whole values (ZeRO-3 gathers them; other
    setups hold them whole already). Every process must enter it."""
    if uses_deepspeed(accelerator) and _zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(_trainables(model).values()), modifier_rank=None):
            yield
    else:
        yield


def trainable_state(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full fp32 master value of every trainable parameter, on the CPU. A collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().cpu() for n, p in _trainables(model).items()}


def optimizer_state(accelerator: Accelerator, model: nn.Module, layout: list[list[str]]) -> dict[str, Any]:
    """The whole Adam state as ``torch.optim.AdamW.state_dict()`` of a one-process run would give it:
    ``layout`` names the parameters of each group in the order the optimizer was built. A collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero, base = _engine_optimizers(accelerator)
    _link_optimizer_state(zero, base)
    params = _trainables(model)
    flat_state = next(iter(base.state.values()), None)  # every flat partition has stepped alike
    keys = [k for k in (flat_state or {}) if k != "step"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    groups, index = [], 0
    for group, names in zip(base.param_groups, layout, strict=True):
        ids = []
        for name in names:
            if flat_state is not None:
                entry = {k: safe_get_full_optimizer_state(params[name], k).detach().cpu() for k in keys}
                state[index] = {"step": flat_state["step"].detach().clone().cpu(), **entry}
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def load_state(
    accelerator: Accelerator,
    model: nn.Module,
    layout: list[list[str]],
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
) -> None:
    """Put a checkpoint's weights and Adam state (as ``optimizer_state`` writes them) into DeepSpeed's
    shards and the model's parameters. Every process calls it with the same values."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = _trainables(model)
    if weights.keys() != params.keys():
        raise ValueError("the checkpoint's trainable parameters are not this model's")
    gathered = (
        deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
        if _zero_stage(accelerator) == 3
        else contextlib.nullcontext()
    )
    with torch.no_grad():
        with gathered:  # the model's working copy (ZeRO-3: re-partitioned from rank 0 on exit)
            for name, param in params.items():
                param.data.copy_(weights[name])
        for name, param in params.items():  # the fp32 masters the optimizer steps
            safe_set_full_fp32_param(param, weights[name].to(param.device))
    zero, base = _engine_optimizers(accelerator)
    for live, saved in zip(base.param_groups, optimizer["param_groups"], strict=True):
        live.update({k: v for k, v in saved.items() if k != "params"})
    if not optimizer["state"]:
        return
    first = next(iter(optimizer["state"].values()))
    # torch's Adam creates its state at its first step: before one there is none to write into, so create
    # it (zeros, then the saved values through each parameter's slice).
    for flat in _flat_partitions(zero):
        if not base.state.get(flat):
            base.state[flat] = {k: torch.zeros_like(flat) for k in first if k != "step"}
        base.state[flat]["step"] = first["step"].clone()
    _link_optimizer_state(zero, base)
    index = 0
    for names in layout:
        for name in names:
            for key, value in optimizer["state"][index].items():
                if key != "step":
                    safe_set_full_optimizer_state(params[name], value.to(params[name].device), key)
            index += 1
