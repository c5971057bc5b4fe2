"""The recipe's side of a quantized base (``model.quantize``): checks at the recipe's key, the quantization
of a freshly built model with its report kept on the model, and the counts ``metrics.json`` records.
``lorakit.quantization`` does the quantizing and knows nothing of recipes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from lorakit.errors import UserError
from lorakit.lora import ParameterCounts, count_parameters, is_lora_parameter

if TYPE_CHECKING:
    from lorakit.recipe import Recipe

QUANTIZE_REPORT = "_lorakit_quantize_report"  # the model attribute holding quantize_base's QuantizeReport


def check_quantize(recipe: Recipe) -> None:
    """One-line errors at ``model.quantize``: a quantized base with full fine-tuning, or a missing extra."""
    method = recipe.model.quantize
    if method == "none":
        return
    if recipe.method == "full":
        raise UserError(
            f"a {method} base is frozen: quantize needs method: lora", recipe.where("model.quantize")
        )
    from lorakit.quantization import MissingExtraError, check_available

    try:
        check_available(method)
    except MissingExtraError as exc:
        raise UserError(str(exc).removeprefix("model.quantize: "), recipe.where("model.quantize")) from None


@dataclass(frozen=True)
class QuantizedCounts(ParameterCounts):
    """Parameter counts plus the base's quantization (``model.quantize``): metrics.json's ``parameters``
    carries every field. ``base_weight_bytes``: every parameter and buffer but the adapter's, quantized
    layers at their stored size."""

    quantize: str = "none"
    base_weight_bytes: int = 0
    quantized_layers: int = 0
    unquantized_layers: int = 0
    unquantized: dict[str, str] = field(default_factory=dict)


def model_counts(model: nn.Module) -> ParameterCounts:
    """``count_parameters``, with the quantization figures when the base is quantized."""
    counts = count_parameters(model)
    report = getattr(model, QUANTIZE_REPORT, None)
    if report is None:
        return counts
    from lorakit.quantization import base_weight_bytes

    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if is_lora_parameter(n))
    return QuantizedCounts(
        counts.total,
        counts.trainable,
        counts.lora,
        quantize=report.method,
        base_weight_bytes=base_weight_bytes(model) - lora,
        quantized_layers=len(report.quantized),
        unquantized_layers=len(report.unquantized),
        unquantized=dict(report.unquantized),
    )


def quantize_base(model: nn.Module, recipe: Recipe, method: str | None = None) -> None:
    """Store the blocks' linear layers of ``model`` quantized (``model.quantize``, or ``method``), in place;
    the report is kept on the model (``QUANTIZE_REPORT``). A missing extra is a UserError there."""
    method = method or recipe.model.quantize
    if method == "none":
        return
    from lorakit.quantization import MissingExtraError, quantize_model

    try:
        report = quantize_model(model, method, keep=tuple(recipe.lora.modules_to_save or ()))
    except MissingExtraError as exc:
        raise UserError(str(exc).removeprefix("model.quantize: "), recipe.where("model.quantize")) from None
    setattr(model, QUANTIZE_REPORT, report)


def refresh_quantized(model: nn.Module) -> None:
    """After LoRA injection: the DDP ignore list names the quantized weights where they now are."""
    if getattr(model, QUANTIZE_REPORT, None) is None:
        return
    from lorakit.quantization import refresh_ddp_ignore

    refresh_ddp_ignore(model)
