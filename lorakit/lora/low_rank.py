"""The forward and backward pass of a LoRA linear map in as few passes over memory as they can take.

``y = W0 x + b + s·B A x`` (s = alpha/r) written with autograd's ordinary operations makes an extra
output-sized tensor in the forward pass (the out-of-place add of the update), another input-sized one
in the backward pass (the LoRA path's share of dL/dx, then added to the base's), and for a fused
projection such as GPT-2's q|k|v it multiplies the zeros of the slices it does not adapt.
``LoraLinearFunction`` computes the base map, then accumulates each adapted block's ``s·(A x) B_iᵀ`` into
its own output columns in place (a GEMM with beta = 1); backward, it accumulates the LoRA path's
``dL/dx`` into the base's in place the same way. Only the small factors and their gradients get new
tensors; what is saved for backward is what autograd would save (the LoRA input and A x).

Where no graph is recorded (evaluation, generation) the same sum runs without autograd.Function's
bookkeeping; and for a call with more tokens than its weight has rows (batch 32 × 128 on a 768-wide
layer, say) in fp32, BA is folded into a transient copy of W0 for one GEMM (``folding_is_cheaper``):
the update costs about nothing then, while the module itself stays unmerged.

This path runs where lorakit can compute the base map itself: a plain ``nn.Linear`` or GPT-2's
``Conv1D``, frozen, that no hook intercepts. A subclass (a quantised layer, say), a module others hook
into (DeepSpeed ZeRO-3 gathers weights in a forward pre-hook; Accelerate's offloading replaces
``forward``), or a half-precision base outside autocast (whose update is kept in float32) runs its own
forward with the update added by autograd's operations, as before.
"""

from __future__ import annotations

import contextlib
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


def _lora_forward(
    x: torch.Tensor,
    lora_x: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    scale: float,
    offsets: Sequence[int],
    conv1d: bool,
    bs: Sequence[torch.Tensor],
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``LoraLinearFunction``'s forward sum (2-D ``x``), with the LoRA input and ``A x`` it read."""
    w = weight if conv1d else weight.t()
    out = torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
    lx = x if lora_x is None else lora_x
    ax = torch.mm(lx, a.t())
    r = a.shape[0] // len(bs)
    for i, (offset, b) in enumerate(zip(offsets, bs, strict=True)):
        add_product(out, offset, groups, ax[:, i * r : (i + 1) * r], b.t(), scale)
    return out, lx, ax


def slice_columns(t: torch.Tensor, offset: int, size: int, groups: int = 1) -> torch.Tensor:
    """A view of the columns of ``t`` (its last dimension) that one slice of a fused projection's output
    occupies: ``size`` columns from ``offset`` for one group; for ``groups`` equal groups (a per-head
    layout), ``size`` columns from ``offset`` within each, as a (..., groups, size) view."""
    if groups == 1:
        return t[..., offset : offset + size]
    return t.unflatten(-1, (groups, -1))[..., offset : offset + size]


def add_product(
    out: torch.Tensor, offset: int, groups: int, left: torch.Tensor, right: torch.Tensor, alpha: float
) -> None:
    """``out``'s slice columns (``slice_columns``) += alpha · left @ right, in place; ``right``'s columns
    are the slice's, group by group. One group: a GEMM with beta = 1, no temporary."""
    size = right.shape[1] // groups
    target = slice_columns(out, offset, size, groups)
    if groups == 1:
        target.addmm_(left, right, alpha=alpha)
    else:
        target.add_(torch.mm(left, right).unflatten(-1, (groups, size)), alpha=alpha)


def slice_grad(grad: torch.Tensor, offset: int, size: int, groups: int) -> torch.Tensor:
    """``grad``'s columns of one slice as a 2-D (rows, groups·size) matrix, in its B factor's order."""
    cols = slice_columns(grad, offset, size, groups)
    return cols if groups == 1 else cols.reshape(grad.shape[0], groups * size)


def folding_is_cheaper(tokens: int, fan_in: int, fan_out: int, adapted_out: int) -> bool:
    """Whether, without autograd, ``x (W0 + s·BA)ᵀ`` with a transient folded weight moves fewer elements
    through memory than ``x W0ᵀ + s·(x Aᵀ) Bᵀ``.

    Both are memory-bound beyond the base GEMM (a rank-r product does almost no arithmetic per element):
    the LoRA path reads ``x`` once more and reads and writes its adapted output columns; folding writes
    a copy of W0 (plus, for a fused projection, updates its adapted columns). So folding wins once a
    call carries more tokens than the weight has rows, roughly: batch 32 × 128 for a 768-wide layer,
    not batch 1.
    """
    lora_path = tokens * (fan_in + 2 * adapted_out)
    fold = 2 * fan_in * fan_out + (0 if adapted_out == fan_out else 2 * fan_in * adapted_out)
    return fold < lora_path


def _folded_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    scale: float,
    offsets: Sequence[int],
    conv1d: bool,
    bs: Sequence[torch.Tensor],
    groups: int = 1,
) -> torch.Tensor:
    """``x (W0 + s·B_i A_i in its columns)ᵀ + b`` with the folded weight made for this call only: the
    module's own W0 is never written, so the adapter stays separate (switching or unloading it is free)."""
    r = a.shape[0] // len(bs)
    whole = len(bs) == 1 and bs[0].shape[0] == _weight_out(weight, conv1d)
    if whole and not conv1d:
        folded = torch.addmm(weight, bs[0], a, alpha=scale)
    else:
        folded = weight.clone()
        # (in, out) view either way: the block's columns get s·A_iᵀ B_iᵀ.
        columns = folded if conv1d else folded.t()
        for i, (offset, b) in enumerate(zip(offsets, bs, strict=True)):
            add_product(columns, offset, groups, a[i * r : (i + 1) * r].t(), b.t(), scale)
    w = folded if conv1d else folded.t()
    return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)


def _weight_out(weight: torch.Tensor, conv1d: bool) -> int:
    return int(weight.shape[1] if conv1d else weight.shape[0])


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
        groups: int,
        *bs: torch.Tensor,
    ) -> torch.Tensor:
        out, lx, ax = _lora_forward(x, lora_x, weight, bias, a, scale, offsets, conv1d, bs, groups)
        ctx.save_for_backward(lx, ax, weight, a, *bs)
        r = a.shape[0] // len(bs)
        ctx.meta = (scale, tuple(offsets), conv1d, groups, r, lora_x is None, bias is not None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        lx, ax, weight, a, *bs = ctx.saved_tensors
        scale, offsets, conv1d, groups, r, shared, has_bias = ctx.meta
        need = ctx.needs_input_grad
        need_x, need_lora_x, need_a = need[0], need[1], need[4]
        grads_b: list[torch.Tensor | None] = []
        parts = []
        for i, (offset, b) in enumerate(zip(offsets, bs, strict=True)):
            g = slice_grad(grad, offset, b.shape[0] // groups, groups)
            parts.append(torch.mm(g, b))
            grads_b.append(torch.mm(g.t(), ax[:, i * r : (i + 1) * r]).mul_(scale) if need[9 + i] else None)
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
        return (grad_x, grad_lora_x, None, grad_bias, grad_a, None, None, None, None, *grads_b)


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
    groups: int = 1,
) -> torch.Tensor:
    """The same sum from the module's own forward and autograd's operations (see the module docstring
    for when this runs)."""
    result = base(x)
    delta = sliced_update(F.linear(lora_x, a), bs, offsets, scale, result.shape[-1], groups)
    return result + delta.to(result.dtype)


def sliced_update(
    ax: torch.Tensor,
    bs: Sequence[torch.Tensor],
    offsets: Sequence[int],
    scale: float,
    fan_out: int,
    groups: int = 1,
) -> torch.Tensor:
    """``scale · ax_i B_iᵀ`` in each slice's output columns and zeros elsewhere, (..., fan_out), built by
    concatenation rather than in place (autograd's operations only); ``ax`` is ``A x`` for the stacked A."""
    r = ax.shape[-1] // len(bs)
    lead, width = ax.shape[:-1], fan_out // groups
    pieces, at = [], 0
    for i, (offset, b) in enumerate(zip(offsets, bs, strict=True)):
        size = b.shape[0] // groups
        if offset > at:
            pieces.append(ax.new_zeros(*lead, groups, offset - at))
        pieces.append((ax[..., i * r : (i + 1) * r] @ (b * scale).t()).unflatten(-1, (groups, size)))
        at = offset + size
    if at < width:
        pieces.append(ax.new_zeros(*lead, groups, width - at))
    delta = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
    return delta.flatten(-2)


def lora_linear(
    base: nn.Module,
    x: torch.Tensor,
    lora_x: torch.Tensor,
    a: torch.Tensor,
    bs: Sequence[torch.Tensor],
    offsets: Sequence[int],
    scale: float,
    groups: int = 1,
) -> torch.Tensor:
    """``base(x)`` plus ``scale · B_i A_i lora_x`` in output columns ``offsets[i]`` onwards (within each of
    ``groups`` equal groups of columns: a per-head fused layout).

    ``a`` is the A factors stacked (k·r, in), ``bs`` the B factors (d_i, r); ``lora_x`` is the LoRA path's
    input (``x`` after LoRA dropout, in the LoRA weights' dtype outside autocast), ``x`` itself when that
    changes nothing.
    """
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    same_dtype = x.dtype == base.weight.dtype == a.dtype and all(b.dtype == a.dtype for b in bs)
    if not computes_itself(base) or not (autocast or same_dtype):
        return _update_by_autograd(base, x, lora_x, a, bs, offsets, scale, groups)
    lead, fan_in = x.shape[:-1], x.shape[-1]
    shared = lora_x is x
    weight, bias = base.weight, base.bias
    if autocast:
        # What autocast would do to each matmul's inputs, done once here.
        dtype = torch.get_autocast_dtype(device_type)
        x, lora_x = x.to(dtype), lora_x.to(dtype)
        weight, a = weight.to(dtype), a.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        bs = [b.to(dtype) for b in bs]
    x2d = x.reshape(-1, fan_in)
    lora_x2d = None if shared else lora_x.reshape(-1, lora_x.shape[-1])
    conv1d, fan_out = is_conv1d(base), _out_features(base)
    # The function runs outside autocast: what autocast would do to each matmul's inputs is done above.
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x2d, lora_x, a, *bs)):
            out = LoraLinearFunction.apply(
                x2d, lora_x2d, weight, bias, a, scale, tuple(offsets), conv1d, groups, *bs
            )
        elif (
            shared
            and x2d.dtype in (torch.float32, torch.float64)
            and folding_is_cheaper(x2d.shape[0], fan_in, fan_out, sum(b.shape[0] for b in bs))
        ):
            # No graph to record (evaluation, generation) and many tokens: BA folded into a transient
            # weight. Only in fp32/fp64: W0 + s·BA rounded to bf16 or fp16 would lose much of the update.
            out = _folded_forward(x2d, weight, bias, a, scale, offsets, conv1d, bs, groups)
        else:  # no graph to record: the same sum without autograd.Function's bookkeeping
            out = _lora_forward(x2d, lora_x2d, weight, bias, a, scale, offsets, conv1d, bs, groups)[0]
    return out.view(*lead, fan_out)
