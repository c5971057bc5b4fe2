"""Putting LoRA into a model: module replacement, trainable marking, counts, adapters by name, merging.

Which modules a config adapts is ``lorakit.lora.targets``' concern (suffixes, a regular expression or
``all-linear``; fused slices); its names are re-exported here, where callers have always found them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from lorakit.lora.config import BIAS_CHOICES, LoraConfig
from lorakit.lora.heads import SavedModules
from lorakit.lora.layers import (
    DEFAULT_ADAPTER,
    LORA_LAYER_TYPES,
    LoraEmbedding,
    LoraFusedLinear,
    LoraLinear,
)
from lorakit.lora.targets import (  # noqa: F401  (TargetNotFoundError...: re-exported, the injection API)
    TargetNotFoundError,
    candidate_names,
    find_targets,
    lookup_pattern,
    split_target,
    suffix_matches,
)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model: all of them, the trainable ones, and the LoRA A/B ones."""

    total: int
    trainable: int
    lora: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_lora(model: nn.Module, config: LoraConfig, adapter: str = DEFAULT_ADAPTER) -> list[str]:
    """Give every target module a LoRA adapter named ``adapter``, in place; returns the adapted names.

    A plain module is replaced by its LoRA wrapper; one that is a wrapper already (it carries another
    adapter) gets this one beside the others. LoRA weights are created on the device of the weight they
    adapt. Trainability is set separately by ``mark_trainable``. ``config.target_modules`` must be given
    (``lorakit.families.lora_defaults`` fills in the paper's choice for a Hugging Face model).
    """
    targets = find_targets(model, config)
    for name, slices in targets.items():
        module = model.get_submodule(name)
        r = int(lookup_pattern(config.rank_pattern, name, config.r))
        alpha = lookup_pattern(config.alpha_pattern, name, config.alpha)
        base = module.base_layer if isinstance(module, LORA_LAYER_TYPES) else module
        fused = slices is not None
        wrapper: nn.Module = module
        if isinstance(base, nn.Embedding):
            if not isinstance(module, LoraEmbedding):
                wrapper = LoraEmbedding(base, None)
            wrapper.add(adapter, r, alpha, config.use_rslora)
        elif fused:
            if not isinstance(module, LoraFusedLinear):
                spec = next(v for k, v in config.fused_slices.items() if suffix_matches(name, k))
                try:
                    wrapper = LoraFusedLinear(base, spec, None)
                except ValueError as err:  # sizes that do not fit this module: another model's layout
                    raise TargetNotFoundError(f"{name}: {err}") from None
                if isinstance(module, LoraLinear):  # whole-module adapters already here stay beside
                    wrapper.adopt(module)
            wrapper.add(adapter, slices, r, alpha, config.dropout, config.init, config.use_rslora)
        elif isinstance(module, LoraFusedLinear):  # slice adapters here already: this one takes every row
            module.add_whole(adapter, r, alpha, config.dropout, config.init, config.use_rslora)
        else:
            if not isinstance(module, LoraLinear):
                wrapper = LoraLinear(base, None)
            wrapper.add(adapter, r, alpha, config.dropout, config.init, config.use_rslora)
        if wrapper is not module:
            set_submodule(model, name, wrapper)
    return list(targets)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every LoRA wrapper in the model."""
    for name, module in model.named_modules():
        if isinstance(module, LORA_LAYER_TYPES):
            yield name, module


def is_lora_parameter(name: str) -> bool:
    """True for the A and B matrices of a LoRA wrapper (by parameter name)."""
    # The last two components: "<module>.lora_A" or, for fused slices, "lora_A.<i>".
    return any(part.startswith("lora_") for part in name.split(".")[-2:])


def saved_module_names(model: nn.Module, modules_to_save: Sequence[str]) -> list[str]:
    """Full names of the modules listed in ``modules_to_save`` (suffix match); error if one is missing."""
    names = [n for n, _ in model.named_modules() if n]
    found, missing = [], []
    for suffix in modules_to_save:
        hits = [n for n in names if suffix_matches(n, suffix)]
        # Keep outermost matches only: "classifier" should not also list "classifier.dense".
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
        (found.extend(hits) if hits else missing.append(suffix))
    if missing:
        raise TargetNotFoundError(f"modules_to_save {missing} match no module in the model")
    return found


def adapter_parameter_names(model: nn.Module, bias: str, modules_to_save: Sequence[str]) -> list[str]:
    """Names of the parameters that belong to the adapter: LoRA A/B, the biases the bias mode selects,
    and every parameter of the modules to save."""
    saved = saved_module_names(model, modules_to_save)
    lora_names = [n for n, _ in lora_modules(model)]
    selected = []
    for name, _ in model.named_parameters():
        module_name = name.rpartition(".")[0]
        if is_lora_parameter(name) or any(name.startswith(s + ".") for s in saved):
            selected.append(name)
        elif name.endswith(".bias") or name == "bias":
            on_lora = module_name.endswith(".base_layer") and module_name[: -len(".base_layer")] in lora_names
            if bias == "all" or (bias == "lora_only" and on_lora):
                selected.append(name)
    return selected


def mark_trainable(model: nn.Module, bias: str = "none", modules_to_save: Sequence[str] = ()) -> list[str]:
    """Freeze everything, then unfreeze the adapter's parameters; returns their names."""
    if bias not in BIAS_CHOICES:
        raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {bias!r}")
    names = set(adapter_parameter_names(model, bias, modules_to_save))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return sorted(names)


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Total, trainable and LoRA-only parameter counts (shared tensors counted once)."""
    seen: set[int] = set()
    total = trainable = lora = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
        lora += param.numel() if is_lora_parameter(name) else 0
    return ParameterCounts(total=total, trainable=trainable, lora=lora)


def adapter_layers(model: nn.Module) -> list[nn.Module]:
    """Every LoRA wrapper and saved-module wrapper of the model: the modules that hold adapters. The walk
    does not descend into them, so its cost does not grow with the number of adapters they hold."""
    found, stack = [], [model]
    while stack:
        module = stack.pop()
        if isinstance(module, (*LORA_LAYER_TYPES, SavedModules)):
            found.append(module)
        else:
            stack.extend(m for m in reversed(module._modules.values()) if m is not None)
    return found


def adapter_names(model: nn.Module, layers: Sequence[nn.Module] | None = None) -> list[str]:
    """Names of the adapters the model holds (LoRA pairs or head copies), in the order first met.
    ``layers``: ``adapter_layers(model)``, when the caller has it already."""
    names: dict[str, None] = {}
    for module in adapter_layers(model) if layers is None else layers:
        names.update(
            dict.fromkeys(module.copies if isinstance(module, SavedModules) else module.lora_adapters)
        )
    return list(names)


def unknown_adapter(model: nn.Module, names: Sequence[str]) -> KeyError:
    """The error for adapter names the model does not hold, naming those it does."""
    held = ", ".join(adapter_names(model)) or "none"
    return KeyError(f"no adapter {', '.join(map(repr, names))} on the model (it holds: {held})")


def active_adapter(model: nn.Module) -> str | None:
    """The adapter plain forward passes apply (None: the bare base model)."""
    layers = adapter_layers(model)
    return layers[0].active_adapter if layers else None


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` (None: none, the bare base model) the one every LoRA layer and saved module
    applies. A pointer switch on each layer: no weight is copied."""
    layers = adapter_layers(model)
    if name is not None and name not in adapter_names(model, layers):
        raise unknown_adapter(model, [name])
    for module in layers:
        module.set_active(name)


@contextlib.contextmanager
def activated(model: nn.Module, name: str | None) -> Iterator[None]:
    """``name`` active for the ``with`` block, the previous adapter again after it."""
    previous = active_adapter(model)
    set_active_adapter(model, name)
    try:
        yield
    finally:
        set_active_adapter(model, previous)


def _one_adapter_only(model: nn.Module) -> None:
    names = adapter_names(model)
    if len(names) > 1:
        raise ValueError(
            f"the model holds {len(names)} adapters ({', '.join(names)}); merging one would shift the "
            "others' base: delete all but one first"
        )


def merge_lora(model: nn.Module) -> None:
    """Add every B·A into its base weight (in place); forward results are unchanged. Refused when the
    model holds several adapters."""
    _one_adapter_only(model)
    for _, module in lora_modules(model):
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Subtract every merged B·A again, restoring W0."""
    for _, module in lora_modules(model):
        module.unmerge()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain base modules back (merged first unless ``merge`` is False); returns the model,
    which then holds ordinary nn.Linear / Conv1D / nn.Embedding layers only. Refused (when merging)
    while the model holds several adapters."""
    if merge:
        _one_adapter_only(model)
    for name, module in list(lora_modules(model)):
        if merge:
            module.merge()
        else:
            module.unmerge()
        set_submodule(model, name, module.base_layer)
    return model
