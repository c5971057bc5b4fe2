"""The forward and backward pass of a LoRA linear map in as few passes over memory as they can take.

``y = W0 x + b + s·B A x`` (s = alpha/r) written with autograd's ordinary operations makes an extra
output-sized tensor in the forward pass (the out-of-place add of the update), another input-sized one
in the backward pass (the LoRA path's share of dL/dx, then added to the base's), and for a fused
projection such as GPT-2's q|k|v it multiplies the zeros of the slices it does not adapt.
``LoraLinearFunction`` computes the base map, then accumulates each adapted block's ``s·(A x) B_iᵀ`` into
its own output columns in place (a GEMM with beta = 1); backward, it accumulates the LoRA path's
``dL/dx`` into the base's in place the same way. Only the small factors and their gradients get new
tensors; what is saved for backward is what autograd would save (the LoRA input and A x).

This path runs where lorakit can compute the base map itself: a plain ``nn.Linear`` or GPT-2's
``Conv1D``, frozen, that no hook intercepts. A subclass (a quantised layer, say), a module others hook
into (DeepSpeed ZeRO-3 gathers weights in a forward pre-hook; Accelerate's offloading replaces
``forward``), or a half-precision base outside autocast (whose update is kept in float32) runs its own
forward with the update added by autograd's operations, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (a linear map whose weight is stored (in, out)), recognised without importing
    transformers: the LoRA core must stay torch-only."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def computes_itself(module: nn.Module) -> bool:
    """True when ``module`` is a frozen plain nn.Linear or Conv1D whose forward nothing intercepts, so
    that lorakit computing ``x Wᵀ + b`` (``x W + b`` for Conv1D) gives exactly what calling it would."""
    plain = type(module) is nn.Linear or is_conv1d(module)
    hooked = bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in vars(module)
    return plain and not hooked and not hasattr(module, "_hf_hook") and not module.weight.requires_grad


class LoraLinearFunction(torch.autograd.Function):
    """``x W0ᵀ + b`` plus ``scale · (lora_x Aᵀ)[:, i·r:(i+1)·r] B_iᵀ`` in output columns ``offsets[i]``
    onwards, for 2-D ``x``; ``lora_x`` None means the LoRA path reads ``x`` itself (no dropout, no cast).

    ``weight`` is frozen and laid out (out, in), or (in, out) with ``conv1d``; every tensor shares one
    dtype (the caller casts).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: torch.Tensor,
        lora_x: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        scale: float,
        offsets: Sequence[int],
        conv1d: bool,
        *bs: torch.Tensor,
    ) -> torch.Tensor:
        w = weight if conv1d else weight.t()
        out = torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
        lx = x if lora_x is None else lora_x
        ax = torch.mm(lx, a.t())
        r = a.shape[0] // len(bs)
        for i, (offset, b) in enumerate(zip(offsets, bs, strict=True)):
            out[:, offset : offset + b.shape[0]].addmm_(ax[:, i * r : (i + 1) * r], b.t(), alpha=scale)
        ctx.save_for_backward(lx, ax, weight, a, *bs)
        ctx.meta = (scale, tuple(offsets), conv1d, r, lora_x is None, bias is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        lx, ax, weight, a, *bs = ctx.saved_tensors
        scale, offsets, conv1d, r, shared, has_bias = ctx.meta
        need = ctx.needs_input_grad
        need_x, need_lora_x, need_a = need[0], need[1], need[4]
        grads_b: list[torch.Tensor | None] = []
        parts = []
        for i, (offset, b) in enumerate(zip(offsets, bs, strict=True)):
            g = grad[:, offset : offset + b.shape[0]]
            parts.append(torch.mm(g, b))
            grads_b.append(torch.mm(g.t(), ax[:, i * r : (i + 1) * r]).mul_(scale) if need[8 + i] else None)
        grad_ax = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).mul_(scale)
        grad_a = torch.mm(grad_ax.t(), lx) if need_a else None
        grad_x = grad_lora_x = None
        if need_x:
            grad_x = torch.mm(grad, weight.t() if conv1d else weight)
            if shared:
                grad_x.addmm_(grad_ax, a)  # the LoRA path's share, accumulated in place
        if need_lora_x:  # only when lora_x was given: with ``shared`` it is None
            grad_lora_x = torch.mm(grad_ax, a)
        grad_bias = grad.sum(0) if has_bias and need[3] else None
        return (grad_x, grad_lora_x, None, grad_bias, grad_a, None, None, None, *grads_b)


def _out_features(module: nn.Module) -> int:
    return int(module.nf) if is_conv1d(module) else int(module.weight.shape[0])


def _update_by_autograd(
    base: nn.Module,
    x: torch.Tensor,
    lora_x: torch.Tensor,
    a: torch.Tensor,
    bs: Sequence[torch.Tensor],
    offsets: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """The same sum from the module's own forward and autograd's operations (see the module docstring
    for when this runs); slices without a B get zeros."""
    result = base(x)
    ax = F.linear(lora_x, a)
    r = a.shape[0] // len(bs)
    pieces, at = [], 0
    for i, (offset, b) in enumerate(zip(offsets, bs, strict=True)):
        if offset > at:
            pieces.append(ax.new_zeros(*ax.shape[:-1], offset - at))
        pieces.append(ax[..., i * r : (i + 1) * r] @ (b * scale).t())
        at = offset + b.shape[0]
    if at < result.shape[-1]:
        pieces.append(ax.new_zeros(*ax.shape[:-1], result.shape[-1] - at))
    delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
    return result + delta.to(result.dtype)


def lora_linear(
    base: nn.Module,
    x: torch.Tensor,
    lora_x: torch.Tensor,
    a: torch.Tensor,
    bs: Sequence[torch.Tensor],
    offsets: Sequence[int],
    scale: float,
) -> torch.Tensor:
    """``base(x)`` plus ``scale · B_i A_i lora_x`` in output columns ``offsets[i]`` onwards.

    ``a`` is the A factors stacked (k·r, in), ``bs`` the B factors (d_i, r); ``lora_x`` is the LoRA path's
    input (``x`` after LoRA dropout, in the LoRA weights' dtype outside autocast), ``x`` itself when that
    changes nothing.
    """
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    same_dtype = x.dtype == base.weight.dtype == a.dtype and all(b.dtype == a.dtype for b in bs)
    if not computes_itself(base) or not (autocast or same_dtype):
        return _update_by_autograd(base, x, lora_x, a, bs, offsets, scale)
    lead, fan_in = x.shape[:-1], x.shape[-1]
    shared = lora_x is x
    weight, bias = base.weight, base.bias
    if autocast:
        # What autocast would do to each matmul's inputs, done once here; the function runs outside it.
        dtype = torch.get_autocast_dtype(device_type)
        x, lora_x = x.to(dtype), lora_x.to(dtype)
        weight, a = weight.to(dtype), a.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        bs = [b.to(dtype) for b in bs]
    x2d = x.reshape(-1, fan_in)
    lora_x2d = None if shared else lora_x.reshape(-1, lora_x.shape[-1])
    args = (x2d, lora_x2d, weight, bias, a, scale, tuple(offsets), is_conv1d(base), *bs)
    if autocast:
        with torch.autocast(device_type, enabled=False):
            out = LoraLinearFunction.apply(*args)
    else:
        out = LoraLinearFunction.apply(*args)
    return out.view(*lead, _out_features(base))
