"""Many adapters on one base model: add one from a config, load one from a PEFT-format directory under a
name, list, activate (a pointer switch), delete, and run mixed batches whose rows each name their adapter.

Every adapter keeps its own LoRA pairs on the layers it targets and its own copy of each module it saves
(``lorakit.lora.heads``), so adapters may differ in rank, alpha, rsLoRA, targets, fused slices and head
size, and adding or loading one never changes what the others compute.

    load_named_adapter(model, "runs/sst2", "sst2")
    load_named_adapter(model, "runs/mnli", "mnli")
    set_active_adapter(model, "mnli")          # one task at a time
    with mixed_batch(model, ["sst2", "mnli", None, "sst2"]) as widths:
        logits = model(**batch).logits         # row i through its own adapter (None: the bare base)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from lorakit.lora.adapter_io import PEFT_PREFIX, config_from_file, copy_lora_weights, read_adapter
from lorakit.lora.config import LoraConfig
from lorakit.lora.heads import SavedModules
from lorakit.lora.inject import (
    LORA_LAYER_TYPES,
    activated,
    active_adapter,
    adapter_layers,
    adapter_names,
    inject_lora,
    is_lora_parameter,
    lora_modules,
    saved_module_names,
    set_active_adapter,
    set_submodule,
    unknown_adapter,
)
from lorakit.lora.layers import SharedInputError


def _head_wrappers(model: nn.Module, modules_to_save: Sequence[str]) -> dict[str, SavedModules]:
    """The saved modules of ``modules_to_save``, each wrapped (once) for per-adapter copies."""
    wrappers = {}
    for path in saved_module_names(model, modules_to_save):
        module = model.get_submodule(path)
        if not isinstance(module, SavedModules):
            module = SavedModules(module)
            module.set_active(active_adapter(model))
            set_submodule(model, path, module)
        wrappers[path] = module
    return wrappers


def add_adapter(model: nn.Module, name: str, config: LoraConfig) -> list[str]:
    """Add a fresh adapter ``name`` (A random, B = 0, heads copied from the base model's) beside the
    model's others; returns the adapted module names. The active adapter stays what it was (the new one
    when it is the first)."""
    if name in adapter_names(model):
        raise ValueError(f"the model already holds an adapter named {name!r}")
    if config.bias != "none":
        raise ValueError(
            f"bias {config.bias!r} trains the base's own biases, which adapters on one base share"
        )
    previous = active_adapter(model) if adapter_names(model) else name
    adapted = inject_lora(model, config, adapter=name)
    for wrapper in _head_wrappers(model, config.modules_to_save).values():
        wrapper.add_copy(name)
    set_active_adapter(model, previous)
    return adapted


def load_named_adapter(model: nn.Module, adapter_dir: str | Path, name: str) -> LoraConfig:
    """Load an adapter written by lorakit or PEFT as adapter ``name`` beside the model's others; returns
    its LoraConfig. Its head tensors go into its own copies of the saved modules, resized to the file's
    shapes (a 3-label head beside a 2-label one). Its weights are loaded frozen, for inference."""
    file_config, tensors, fused = read_adapter(adapter_dir)
    if file_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type {file_config.get('peft_type')!r} is not LORA")
    config = config_from_file(file_config, tensors, fused)
    add_adapter(model, name, config)
    with activated(model, name):
        used = copy_lora_weights(model, tensors, name)
    heads = _head_wrappers(model, config.modules_to_save)
    with torch.no_grad():
        for key, value in tensors.items():
            if key in used or is_lora_parameter(key):
                continue
            path = next((p for p in heads if key.startswith(p + ".")), None)
            if path is None:
                delete_adapter(model, name)
                raise ValueError(
                    f"{adapter_dir}: tensor {PEFT_PREFIX + key} is neither LoRA nor in a saved module"
                )
            param = heads[path].copies[name].get_parameter(key[len(path) + 1 :])
            param.data = value.to(device=param.device, dtype=param.dtype)  # the file's shape wins
    for param in _adapter_parameters(model, name):
        param.requires_grad_(False)
    return config


def _adapter_parameters(model: nn.Module, name: str) -> Iterator[nn.Parameter]:
    for module in adapter_layers(model):
        if isinstance(module, LORA_LAYER_TYPES) and name in module.lora_adapters:
            yield from module.lora_adapters[name].parameters()
        elif isinstance(module, SavedModules) and name in module.copies:
            yield from module.copies[name].parameters()


def adapter_bytes(model: nn.Module, name: str) -> int:
    """Bytes of adapter ``name``'s own tensors (LoRA pairs and head copies)."""
    return sum(p.numel() * p.element_size() for p in _adapter_parameters(model, name))


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``: its LoRA pairs and head copies are dropped and their memory freed (once
    nothing else refers to them). Deleting the active adapter leaves the bare base model active."""
    layers = adapter_layers(model)
    if name not in adapter_names(model, layers):
        raise unknown_adapter(model, [name])
    for module in layers:
        if isinstance(module, LORA_LAYER_TYPES):
            module.delete_adapter(name)
        elif isinstance(module, SavedModules):
            module.delete_copy(name)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, row_adapters: Sequence[str | None]) -> Iterator[dict[str | None, int]]:
    """Within the block, a forward pass applies to row i the adapter ``row_adapters[i]`` (None: the bare
    base model). Rows are grouped by adapter: each LoRA layer runs its base map once over the whole batch
    and adds each adapter's update to that adapter's rows only; each saved module runs every group
    through its own copy. Yields a dict that the pass fills with each adapter's output width (its head's
    label count): rows of narrower heads are padded with NaN to the widest."""
    modules = adapter_layers(model)
    known = set(adapter_names(model, modules))
    unknown = sorted({str(n) for n in row_adapters if n is not None and n not in known})
    if unknown:
        raise unknown_adapter(model, unknown)
    device = next(model.parameters()).device
    index: dict[str | None, list[int]] = {}
    for i, name in enumerate(row_adapters):
        index.setdefault(name, []).append(i)
    routing = [
        (n, slice(rows[0], rows[-1] + 1))  # a contiguous group: a view of its rows, no gather or scatter
        if rows[-1] - rows[0] + 1 == len(rows)
        else (n, torch.tensor(rows, dtype=torch.long, device=device))
        for n, rows in index.items()
    ]
    widths: dict[str | None, int] = {}
    for module in modules:
        module.routing = routing
        if isinstance(module, SavedModules):
            module.widths = widths
    try:
        yield widths
    finally:
        for module in modules:
            module.routing = None
            if isinstance(module, SavedModules):
                module.widths = None


def mixed_logits(
    model: nn.Module, row_adapters: Sequence[str | None], **inputs: torch.Tensor
) -> tuple[torch.Tensor, dict[str | None, int]]:
    """``model(**inputs).logits`` with row i through adapter ``row_adapters[i]``, and each adapter's output
    width (rows padded with NaN to the widest), as ``mixed_batch``. A model that feeds tensors shared by
    all rows through adapted layers (DeBERTa-v2's relative positions) runs one pass per adapter group
    instead, with the same result."""
    try:
        with mixed_batch(model, row_adapters) as widths:
            return model(**inputs).logits, widths
    except SharedInputError:
        pass
    outs: list[tuple[torch.Tensor, torch.Tensor]] = []
    widths = {}
    for name in dict.fromkeys(row_adapters):
        rows = torch.tensor([i for i, r in enumerate(row_adapters) if r == name], dtype=torch.long)
        group = {k: v.index_select(0, rows.to(v.device)) for k, v in inputs.items()}
        with activated(model, name):
            logits = model(**group).logits
        outs.append((rows.to(logits.device), logits))
        widths[name] = int(logits.shape[-1])
    first = outs[0][1]
    width = max(widths.values())
    result = first.new_full((len(row_adapters), *first.shape[1:-1], width), float("nan"))
    for rows, logits in outs:
        result[rows, ..., : logits.shape[-1]] = logits
    return result, widths


def adapted_modules(model: nn.Module) -> dict[str, list[str]]:
    """Each adapter's adapted module paths, by adapter name."""
    out: dict[str, list[str]] = {n: [] for n in adapter_names(model)}
    for path, module in lora_modules(model):
        for name in module.lora_adapters:
            out[name].append(path)
    return out
