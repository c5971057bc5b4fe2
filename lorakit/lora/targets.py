"""Which modules of a model a ``LoraConfig`` adapts: target matching and fused slices.

Targets are given (never guessed: the core knows no model family; ``lorakit.families.lora_defaults`` fills in
the paper's choice for a Hugging Face model) as
* a list of module-name suffixes (``["query", "value"]`` matches ``...attention.self.query``), where an
  entry ``"c_attn[q,v]"`` adapts only slices q and v of a fused projection declared in ``fused_slices``
  (contiguous row blocks: the caller vouches for the layout it declares);
* or one regular expression matched against full module names (``re.fullmatch``, as PEFT does);
* or ``"all-linear"``: every nn.Linear and GPT-2 Conv1D but the output head, resolved as PEFT resolves it
  (``_maybe_include_all_linear_layers``); a fused projection (GPT-2's c_attn) is adapted whole, as in
  PEFT, not as q/v slices. Adapter files name the resolved modules, never the shorthand.

Every requested target must match at least one module; one that matches nothing is an error that
lists the candidate names (PEFT accepts ``["query", "FAKE"]`` silently; we don't).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from lorakit.lora.config import ALL_LINEAR, LoraConfig, is_all_linear, slice_names
from lorakit.lora.heads import SavedModules
from lorakit.lora.layers import LORA_LAYER_TYPES, LoraFusedLinear, LoraLinear, is_conv1d

_SLICE_TARGET = re.compile(r"^(?P<module>[\w.]+)\[(?P<slices>\w+(?:\s*,\s*\w+)*)\]$")
# PEFT's SEQ_CLS_HEAD_NAMES: where a model without output embeddings keeps its classifier's output layer.
_CLASSIFIER_ATTRS = ("score", "classifier")


class TargetNotFoundError(ValueError):
    """A target module (or module to save) matches nothing in the model."""


def suffix_matches(name: str, suffix: str) -> bool:
    """True when ``suffix`` names ``name`` or its trailing dotted components."""
    return name == suffix or name.endswith("." + suffix)


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, *LORA_LAYER_TYPES)) or is_conv1d(module)


def _target_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Modules a target may name: a LoRA wrapper stands for the module it wraps (another adapter is added
    to it), and the copies of saved modules (per-adapter heads) are never adapted."""
    skipped: list[str] = []
    modules = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skipped):
            continue
        if isinstance(module, SavedModules):
            skipped.append(name + ".")
            continue
        if isinstance(module, LORA_LAYER_TYPES):
            skipped.append(name + ".")
        modules[name] = module
    return modules


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last components of the modules LoRA can adapt, for error messages and ``info``."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _adaptable(m)}
    return sorted(names)


def _all_linear(model: nn.Module, config: LoraConfig) -> dict[str, tuple[str, ...] | None]:
    """Every linear layer but those PEFT's all-linear leaves out: the output embeddings (a causal LM's
    lm_head), else a classifier's top-level ``score`` or ``classifier``; and the modules to save, which
    train whole, so a LoRA inside one would duplicate its weights (PEFT refuses to target them)."""
    names = {id(m): n for n, m in model.named_modules() if n}
    getter = getattr(model, "get_output_embeddings", None)  # a transformers method, read by duck typing
    head = getter() if callable(getter) else None
    if head is None:
        # PEFT looks for these with task_type SEQ_CLS only; lorakit's models without output embeddings
        # are its sequence classifiers.
        head = next(
            (getattr(model, a) for a in _CLASSIFIER_ATTRS if getattr(model, a, None) is not None), None
        )
    heads = [names[id(head)]] if id(head) in names else []
    heads += [n for n in names.values() if any(suffix_matches(n, m) for m in config.modules_to_save)]
    found: dict[str, tuple[str, ...] | None] = {
        n: None
        for n, m in _target_candidates(model).items()
        # A LoRA wrapper stands for the linear layer it wraps, as PEFT's tuner layers do; LoraEmbedding not.
        if (isinstance(m, (nn.Linear, LoraLinear, LoraFusedLinear)) or is_conv1d(m))
        and not any(n == h or n.startswith(h + ".") for h in heads)
    }
    if not found:
        raise TargetNotFoundError(
            f"target_modules {ALL_LINEAR!r} finds no linear layer outside the output head "
            f"({', '.join(heads) or 'none'}); candidates: {', '.join(candidate_names(model))}"
        )
    return found


def lookup_pattern(pattern: Mapping[str, float], name: str, default: float) -> float:
    for key, value in pattern.items():
        if suffix_matches(name, key):
            return value
    return default


def split_target(target: str) -> tuple[str, tuple[str, ...] | None]:
    """A list entry of ``target_modules`` as (module-name suffix, slices): ``"c_attn[q,v]"`` gives
    ``("c_attn", ("q", "v"))``, a plain suffix ``(suffix, None)``."""
    match = _SLICE_TARGET.match(target)
    if match is None:
        return target, None
    return match["module"], tuple(s.strip() for s in match["slices"].split(","))


def _check_slices(config: LoraConfig, target: str, suffix: str, slices: tuple[str, ...]) -> None:
    """Refuse a slice target unless the projection's slices are declared in ``config.fused_slices``:
    guessing them would adapt the wrong rows without any error."""
    known = next((v for k, v in config.fused_slices.items() if suffix_matches(suffix, k)), None)
    if known is None or any(s not in slice_names(known) for s in slices):
        raise TargetNotFoundError(
            f"target {target!r}: {suffix!r} has no slices {list(slices)}; "
            f"known fused projections: {dict(config.fused_slices) or 'none'}"
        )


def find_targets(model: nn.Module, config: LoraConfig) -> dict[str, tuple[str, ...] | None]:
    """Module names to adapt, each with the slices to adapt (None: the whole module).

    Raises TargetNotFoundError naming every target that matches no adaptable module, and for null
    ``target_modules``: the core knows no model family, so it has no default to pick.
    """
    if config.target_modules is None:
        raise TargetNotFoundError(
            "target_modules is null: give the modules to adapt (names, a regular expression or all-linear); "
            "lorakit.families.lora_defaults fills in the paper's choice for a Hugging Face model"
        )
    modules = _target_candidates(model)
    found: dict[str, tuple[str, ...] | None] = {}
    if is_all_linear(config.target_modules):
        return _all_linear(model, config)
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
        suffix, slices = split_target(target)
        hits = [n for n, m in modules.items() if suffix_matches(n, suffix) and _adaptable(m)]
        if not hits:
            missing.append(target)
            continue
        if slices is not None:
            _check_slices(config, target, suffix, slices)
        for n in hits:
            found[n] = slices
    if missing:
        raise TargetNotFoundError(
            f"target_modules {missing} match no module; candidates: {', '.join(candidate_names(model))}"
        )
    return found
