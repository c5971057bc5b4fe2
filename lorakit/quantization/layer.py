"""A frozen linear layer whose weight is stored quantized, and the autograd op that runs it.

``QuantizedLinear`` is an ``nn.Linear`` subclass (so LoRA targets, ``all-linear`` and the core's
``linear_shape`` see a linear map with ``in_features``/``out_features``), laid out (out, in) whatever
the original module was: GPT-2's ``Conv1D`` (in, out) is transposed before quantizing. The LoRA core's
``LoraLinear`` wraps it like any base it cannot compute itself (``lorakit.lora.low_rank.computes_itself``
is false for a subclass): it calls this module's forward and adds the update with autograd's operations.

``QuantizedLinearFunction`` is the forward and backward of ``x Wᵀ + b`` for the quantized W: the forward
dequantizes W into a transient tensor, freed when the call returns; the backward computes
``dL/dx = grad · dequant(W)`` from the quantized storage again. What it saves for backward is the
quantized storage alone (and no ``x``: W is frozen, so there is no weight gradient to compute): autograd
never keeps a dense float copy of a weight alive between forward and backward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class QuantizedLinearFunction(torch.autograd.Function):
    """``x dequant(*stored)ᵀ + b``; the backward pass recomputes ``dequant(*stored)`` for ``dL/dx``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        dequant: Callable[..., torch.Tensor],
        *stored: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(*stored)
        ctx.dequant = dequant
        weight = dequant(*stored).to(x.dtype)  # transient: freed when this returns
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        stored = ctx.saved_tensors
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = torch.matmul(grad, ctx.dequant(*stored).to(grad.dtype)) if need_x else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if need_bias else None
        return (grad_x, grad_bias, None, *([None] * len(stored)))


class QuantizedLinear(nn.Linear, ABC):
    """A frozen ``nn.Linear`` whose weight is held quantized; subclasses say how (``stored``,
    ``dequant``). The bias stays in full precision. ``weight`` is the quantized storage's main tensor
    (int8 rows, or torchao's NF4 tensor), so code reading ``module.weight.device`` keeps working."""

    method = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: no dense weight is ever allocated
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @abstractmethod
    def stored(self) -> tuple[torch.Tensor, ...]:
        """The tensors the weight is stored as, in ``dequant_fn``'s order."""

    @staticmethod
    @abstractmethod
    def dequant_fn(*stored: torch.Tensor) -> torch.Tensor:
        """The dense (out, in) weight from ``stored()``."""

    def dequantize(self) -> torch.Tensor:
        """The dense (out, in) float32 weight this layer computes with."""
        with torch.no_grad():
            return self.dequant_fn(*self.stored()).to(torch.float32)

    @abstractmethod
    def weight_bytes(self) -> int:
        """Bytes of the quantized weight's storage (the bias excluded)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuantizedLinearFunction.apply(x, self.bias, self.dequant_fn, *self.stored())

    def reset_parameters(self) -> None:  # nn.Linear's would initialise a dense weight
        return None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quantize={self.method}"
        )
