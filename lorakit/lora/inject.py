"""Putting LoRA into a model: target matching, module replacement, trainable marking, counts, merging.

Targets are given as
* a list of module-name suffixes (``["query", "value"]`` matches ``...attention.self.query``), where an
  entry ``"c_attn[q,v]"`` adapts only slices q and v of a fused projection declared in ``fused_slices``;
* or one regular expression matched against full module names (``re.fullmatch``, as PEFT does).

Every requested target must match at least one module; one that matches nothing is an error that
lists the candidate names (PEFT accepts ``["query", "FAKE"]`` silently; we don't).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from torch import nn

from lorakit.lora import presets
from lorakit.lora.config import BIAS_CHOICES, LoraConfig
from lorakit.lora.layers import (
    LORA_LAYER_TYPES,
    LoraEmbedding,
    LoraFusedLinear,
    LoraLinear,
    is_conv1d,
)

_SLICE_TARGET = re.compile(r"^(?P<module>[\w.]+)\[(?P<slices>\w+(?:\s*,\s*\w+)*)\]$")


class TargetNotFoundError(ValueError):
    """A target module (or module to save) matches nothing in the model."""


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model: all of them, the trainable ones, and the LoRA A/B ones."""

    total: int
    trainable: int
    lora: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def suffix_matches(name: str, suffix: str) -> bool:
    """True when ``suffix`` names ``name`` or its trailing dotted components."""
    return name == suffix or name.endswith("." + suffix)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last components of the modules LoRA can adapt, for error messages and ``info``."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _adaptable(m)}
    return sorted(names)


def _lookup(pattern: Mapping[str, float], name: str, default: float) -> float:
    for key, value in pattern.items():
        if suffix_matches(name, key):
            return value
    return default


def resolve_defaults(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with null targets replaced by the paper's choice for the model's ``config.model_type``
    (a Hugging Face model attribute; read by duck typing) and its fused projections filled in."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_modules is not None and (config.fused_slices or model_type is None):
        return config
    if model_type is None:
        raise TargetNotFoundError(
            "target_modules is null and the model has no config.model_type to pick defaults"
        )
    targets = config.target_modules
    if targets is None:
        try:
            targets = presets.paper_targets(model_type)
        except KeyError as err:
            raise TargetNotFoundError(err.args[0]) from None
    fused = dict(config.fused_slices) or presets.fused_slices(model_type)
    return replace(config, target_modules=targets, fused_slices=fused)


def find_targets(model: nn.Module, config: LoraConfig) -> dict[str, tuple[str, ...] | None]:
    """Module names to adapt, each with the slices to adapt (None: the whole module).

    Raises TargetNotFoundError naming every target that matches no adaptable module.
    """
    config = resolve_defaults(model, config)
    modules = {n: m for n, m in model.named_modules() if n and not isinstance(m, LORA_LAYER_TYPES)}
    found: dict[str, tuple[str, ...] | None] = {}
    if isinstance(config.target_modules, str):
        regex = re.compile(config.target_modules)
        found = {n: None for n, m in modules.items() if regex.fullmatch(n) and _adaptable(m)}
        if not found:
            raise TargetNotFoundError(
                f"target_modules regex {config.target_modules!r} matches no module; "
                f"candidates: {', '.join(candidate_names(model))}"
            )
        return found
    missing = []
    for target in config.target_modules:
        slice_match = _SLICE_TARGET.match(target)
        suffix = slice_match["module"] if slice_match else target
        hits = [n for n, m in modules.items() if suffix_matches(n, suffix) and _adaptable(m)]
        if not hits:
            missing.append(target)
            continue
        slices = None
        if slice_match:
            slices = tuple(s.strip() for s in slice_match["slices"].split(","))
            known = next((v for k, v in config.fused_slices.items() if suffix_matches(suffix, k)), None)
            if known is None or any(s not in known for s in slices):
                raise TargetNotFoundError(
                    f"target {target!r}: {suffix!r} has no slices {list(slices)}; "
                    f"known fused projections: {dict(config.fused_slices) or 'none'}"
                )
        for n in hits:
            found[n] = slices
    if missing:
        raise TargetNotFoundError(
            f"target_modules {missing} match no module; candidates: {', '.join(candidate_names(model))}"
        )
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Replace every target module with its LoRA wrapper, in place; returns the adapted names.

    LoRA weights are created on the device of the weight they adapt. Trainability is set separately by
    ``mark_trainable``.
    """
    config = resolve_defaults(model, config)
    targets = find_targets(model, config)
    for name, slices in targets.items():
        base = model.get_submodule(name)
        r = int(_lookup(config.rank_pattern, name, config.r))
        alpha = _lookup(config.alpha_pattern, name, config.alpha)
        wrapper: nn.Module
        if isinstance(base, nn.Embedding):
            wrapper = LoraEmbedding(base, r, alpha, init=config.init, use_rslora=config.use_rslora)
        elif slices is not None:
            slice_names = next(v for k, v in config.fused_slices.items() if suffix_matches(name, k))
            wrapper = LoraFusedLinear(
                base, slice_names, slices, r, alpha, config.dropout, config.init, config.use_rslora
            )
        else:
            wrapper = LoraLinear(base, r, alpha, config.dropout, config.init, config.use_rslora)
        _set_submodule(model, name, wrapper)
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


def merge_lora(model: nn.Module) -> None:
    """Add every B·A into its base weight (in place); forward results are unchanged."""
    for _, module in lora_modules(model):
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Subtract every merged B·A again, restoring W0."""
    for _, module in lora_modules(model):
        module.unmerge()


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain base modules back (merged first unless ``merge`` is False); returns the model,
    which then holds ordinary nn.Linear / Conv1D / nn.Embedding layers only."""
    for name, module in list(lora_modules(model)):
        if merge:
            module.merge()
        else:
            module.unmerge()
        _set_submodule(model, name, module.base_layer)
    return model
