"""Replacing a model's block linear layers by quantized ones, and back.

Quantized: every ``nn.Linear`` and GPT-2 ``Conv1D`` inside the model's numbered transformer blocks
(a module path with an index, ``encoder.layer.3.attention.self.query``, ``h.0.attn.c_attn``), so that
embeddings, norms, the pooler and the task head (``classifier``, ``score``, ``lm_head``: outside the
blocks) stay in full precision; a module listed in ``keep`` (the recipe's ``lora.modules_to_save``) stays
too. A layer whose shape the quantizer cannot block (nf4: element count not a multiple of 64·256) stays
dense and is counted.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from lorakit.lora import suffix_matches
from lorakit.lora.low_rank import is_conv1d
from lorakit.quantization.int8 import Int8Linear
from lorakit.quantization.layer import QuantizedLinear
from lorakit.quantization.nf4 import NF4Linear, can_block, nf4_api, nf4_bytes

logger = logging.getLogger(__name__)

QUANTIZE_CHOICES = ("none", "nf4", "int8")
_BLOCK_PATH = re.compile(r"(^|\.)\d+(\.|$)")
CONV1D_FLAG = "_lorakit_was_conv1d"


@dataclass
class QuantizeReport:
    """What ``quantize_model`` did: the layers it quantized, those it left dense (and why), and the
    block linear weights' bytes before and after."""

    method: str
    quantized: list[str] = field(default_factory=list)
    unquantized: dict[str, str] = field(default_factory=dict)  # name -> reason
    dense_bytes: int = 0  # the quantized layers' weights as they were
    quantized_bytes: int = 0  # the same weights quantized

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "quantized_layers": len(self.quantized),
            "unquantized_layers": len(self.unquantized),
            "unquantized": dict(self.unquantized),
            "quantized_weight_bytes": self.quantized_bytes,
            "dense_weight_bytes": self.dense_bytes,
        }


def _in_block(name: str) -> bool:
    return bool(_BLOCK_PATH.search(name))


def quantizable(name: str, module: nn.Module, keep: tuple[str, ...] = ()) -> bool:
    """Whether ``quantize_model`` would consider ``module``: a block's Linear or Conv1D, not kept."""
    linear = type(module) is nn.Linear or is_conv1d(module)
    return linear and _in_block(name) and not any(suffix_matches(name, k) for k in keep)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear, or of a Conv1D transposed."""
    w = module.weight.detach()
    return w.t() if is_conv1d(module) else w


def quantized_size(method: str, shape: tuple[int, int]) -> int | None:
    """Bytes of an (out, in) weight quantized by ``method``; None where it cannot be blocked."""
    out_f, in_f = shape
    if method == "int8":
        return out_f * in_f + 4 * out_f
    if method == "nf4":
        return nf4_bytes(out_f * in_f) if can_block(shape) else None
    raise ValueError(f"unknown quantization {method!r}")


def check_available(method: str) -> None:
    """Raise ``MissingExtraError`` (an ImportError) when ``method`` needs an extra that is missing."""
    if method == "nf4":
        nf4_api()


def quantize_model(model: nn.Module, method: str, keep: tuple[str, ...] = ()) -> QuantizeReport:
    """Replace the block linear layers of ``model`` by frozen quantized ones, in place."""
    if method not in QUANTIZE_CHOICES or method == "none":
        raise ValueError(f"quantize must be nf4 or int8, got {method!r}")
    check_available(method)
    report = QuantizeReport(method)
    targets = [(n, m) for n, m in model.named_modules() if quantizable(n, m, keep)]
    for name, module in targets:
        w = dense_weight(module)
        if method == "nf4" and not can_block(w.shape):
            report.unquantized[name] = f"{tuple(w.shape)}: not a multiple of 64·256 weights"
            continue
        bias = module.bias
        layer: QuantizedLinear = (NF4Linear if method == "nf4" else Int8Linear)(w, bias)
        layer.to(w.device)
        if is_conv1d(module):
            setattr(layer, CONV1D_FLAG, True)
        report.dense_bytes += w.numel() * w.element_size()
        report.quantized_bytes += layer.weight_bytes()
        report.quantized.append(name)
        _set_submodule(model, name, layer)
    if report.unquantized:
        logger.warning(
            "model.quantize %s: %d of %d block linear layers cannot be blocked and stay dense (%s%s)",
            method,
            len(report.unquantized),
            len(targets),
            next(iter(report.unquantized)),
            ", ..." if len(report.unquantized) > 1 else "",
        )
    logger.info(
        "model.quantize %s: %d layers quantized, their weights %.1f MiB -> %.1f MiB",
        method,
        len(report.quantized),
        report.dense_bytes / 2**20,
        report.quantized_bytes / 2**20,
    )
    # DistributedDataParallel broadcasts every parameter and buffer at start; frozen quantized weights
    # are built identically on every process from the same checkpoint, and NF4 tensors cannot be sent.
    _ignore_in_ddp(model)
    return report


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def _ignore_in_ddp(model: nn.Module) -> None:
    """Name the quantized layers' tensors in ``_ddp_params_and_buffers_to_ignore`` (read by DDP)."""
    names = []
    for name, module in quantized_layers(model):
        names += [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False) if p != "bias"]
        names += [f"{name}.{b}" for b, _ in module.named_buffers(recurse=False)]
    model._ddp_params_and_buffers_to_ignore = names  # type: ignore[attr-defined]


def refresh_ddp_ignore(model: nn.Module) -> None:
    """Recompute the DDP ignore list after modules moved (LoRA injection wraps them as base_layer)."""
    if quantized_layers(model):
        _ignore_in_ddp(model)


def dequantize_model(model: nn.Module, restore_conv1d: bool = True) -> int:
    """Replace every quantized layer by a dense one holding ``dequant(W)`` (float32), in place: an
    ``nn.Linear``, or the ``Conv1D`` it came from (laid out (in, out) again) with ``restore_conv1d``.
    Returns how many were replaced."""
    layers = quantized_layers(model)
    for name, layer in layers:
        _set_submodule(model, name, dense_layer(layer, restore_conv1d))
    if hasattr(model, "_ddp_params_and_buffers_to_ignore"):
        del model._ddp_params_and_buffers_to_ignore
    return len(layers)


def dense_layer(layer: QuantizedLinear, restore_conv1d: bool = True) -> nn.Module:
    w = layer.dequantize()
    bias = None if layer.bias is None else layer.bias.detach().clone()
    if restore_conv1d and getattr(layer, CONV1D_FLAG, False):
        from transformers.pytorch_utils import Conv1D

        dense: nn.Module = Conv1D(layer.out_features, layer.in_features).to(w.device)
        with torch.no_grad():
            dense.weight.copy_(w.t())
            if bias is not None:
                dense.bias.copy_(bias)
    else:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=w.device)
        with torch.no_grad():
            dense.weight.copy_(w)
            if bias is not None:
                dense.bias.copy_(bias)
        if getattr(layer, CONV1D_FLAG, False):
            setattr(dense, CONV1D_FLAG, True)
    dense.requires_grad_(False)
    return dense


def restore_conv1d(model: nn.Module) -> int:
    """Turn the dense ``nn.Linear`` layers ``dequantize_model(restore_conv1d=False)`` made from Conv1D
    back into Conv1D (after merging, say). Returns how many."""
    from transformers.pytorch_utils import Conv1D

    found = [
        (n, m) for n, m in model.named_modules() if type(m) is nn.Linear and getattr(m, CONV1D_FLAG, False)
    ]
    for name, linear in found:
        conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.t())
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
            else:
                conv.bias = None
        _set_submodule(model, name, conv)
    return len(found)


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, quantized layers at their stored size (with their scales);
    buffers such as position ids are not weights and are left out."""
    quantized = {id(m): m for _, m in quantized_layers(model)}
    skip = {id(t) for m in quantized.values() for t in m.stored()}
    total = sum(m.weight_bytes() for m in quantized.values())  # type: ignore[operator]
    seen: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def merge_dense(model: nn.Module) -> nn.Module:
    """``unload_lora(model, merge=True)`` that also works on a quantized base: quantized layers are first
    replaced by dense ones holding ``dequant(W0)`` (as nn.Linear, so the LoRA wrappers' (out, in) update
    fits), merged, and GPT-2's turned back into Conv1D: a plain dense model giving the quantized model's
    outputs."""
    from lorakit.lora import unload_lora

    if not quantized_layers(model):
        return unload_lora(model, merge=True)
    dequantize_model(model, restore_conv1d=False)
    model = unload_lora(model, merge=True)
    restore_conv1d(model)
    for name in ("_lorakit_quantize_report",):
        if hasattr(model, name):
            delattr(model, name)
    return model
