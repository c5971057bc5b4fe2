"""``model.quantize: int8``: per-row absmax int8 weights, lorakit's own (no extra needed).

Each output row i of W is stored as ``q_i = round(W_i · 127 / max|W_i|)`` in int8 with its scale
``s_i = max|W_i| / 127`` in float32: W ≈ s ⊙ q, 1 byte a weight plus 4 bytes a row.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.quantization.layer import QuantizedLinear


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale float32 (out,)) for a dense (out, in) weight."""
    w = weight.detach().to(torch.float32)
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale[:, None]


class Int8Linear(QuantizedLinear):
    """A frozen linear map with per-row absmax int8 weights."""

    method = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """``weight``: the dense (out, in) weight to quantize."""
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        q, scale = quantize_rows(weight)
        self.weight = nn.Parameter(q, requires_grad=False)  # int8: never cast by .float() / .to(dtype)
        self.register_buffer("weight_scale", scale)

    def stored(self) -> tuple[torch.Tensor, ...]:
        return (self.weight, self.weight_scale)

    dequant_fn = staticmethod(dequantize_rows)

    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.weight_scale.numel() * 4
