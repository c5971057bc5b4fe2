"""A Hugging Face model's ``LoraConfig`` completed from its family's spec: the paper's targets where none
are given, the fused projections' slices from the model's config, and the slice targets that its family's
layout forbids refused before the core, which knows no family, would adapt the wrong rows."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from lorakit.families.from_config import fused_slices
from lorakit.families.spec import HfConfig, family, paper_targets
from lorakit.lora import (
    FusedLayout,
    LoraConfig,
    TargetNotFoundError,
    candidate_names,
    slice_layout,
    split_target,
    suffix_matches,
)


def lora_defaults(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` for ``model`` (a Hugging Face model: its ``config.model_type`` is read by duck typing)
    with null ``target_modules`` replaced by the paper's choice for its family and empty ``fused_slices``
    by its fused projections' layout, read from the model's config.

    Raises the core's TargetNotFoundError, in one line, where the family has no default (listing the
    model's module names) and for slice targets its layout does not allow (``check_slice_targets``).
    """
    hf_config = getattr(model, "config", None)
    model_type = getattr(hf_config, "model_type", None)
    targets = config.target_modules
    if targets is None:
        if model_type is None:
            raise TargetNotFoundError(
                "target_modules is null and the model has no config.model_type to pick defaults"
            )
        try:
            targets = paper_targets(model_type)
        except KeyError as err:
            # The model is at hand here, so the message can show the names its modules really have.
            raise TargetNotFoundError(
                f"{err.args[0]}; this model's modules: {', '.join(candidate_names(model))}"
            ) from None
    config = replace(
        config, target_modules=targets, fused_slices=dict(config.fused_slices) or fused_slices(hf_config)
    )
    check_slice_targets(hf_config, config)
    return config


def check_slice_targets(hf_config: HfConfig, config: LoraConfig) -> None:
    """Refuse the slice targets (``"qkv_proj[q,v]"``) of ``config`` whose projection ``config.fused_slices``
    declares otherwise than the model's config lays it out: the core adapts whichever rows it is told, so
    equal thirds declared for Phi-3's grouped-query ``qkv_proj``, or contiguous blocks for GPT-NeoX's
    per-head ``query_key_value``, would adapt the wrong rows without any error. Only the family knows."""
    model_type = getattr(hf_config, "model_type", None)
    if family(model_type) is None or config.target_modules is None or isinstance(config.target_modules, str):
        return
    true_layouts = fused_slices(hf_config)
    for target in config.target_modules:
        suffix, slices = split_target(target)
        true = next((v for k, v in true_layouts.items() if suffix_matches(suffix, k)), None)
        declared = next((v for k, v in config.fused_slices.items() if suffix_matches(suffix, k)), None)
        if slices is None or true is None or declared is None:
            continue  # a whole module, a projection the family does not fuse, or none declared (core's error)
        if _as_layout(declared, true) != true:
            raise TargetNotFoundError(
                f"target {target!r}: a {model_type} model's {suffix} is laid out as {_describe(true)}, "
                f"not as declared ({_describe(_as_layout(declared, true))}); leave LoraConfig.fused_slices "
                "empty to take the layout from the model's config (lorakit.families.fused_slices)"
            )


def _as_layout(declared: object, true: FusedLayout) -> FusedLayout | None:
    """A declared layout on the true one's rows (names alone: equal contiguous slices), or None when it
    cannot even cover them."""
    try:
        return slice_layout(declared, true.groups * true.width)  # type: ignore[arg-type]
    except ValueError:
        return None


def _describe(layout: FusedLayout | None) -> str:
    if layout is None:
        return "slices that do not cover its rows"
    blocks = " | ".join(f"{name} {rows}" for name, rows in layout.slices)
    return blocks if layout.groups == 1 else f"{layout.groups} groups of {blocks}"
