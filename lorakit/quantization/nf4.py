"""``model.quantize: nf4``: torchao's 4-bit NormalFloat tensor (QLoRA's NF4 with double-quantized
scales: blocks of 64 weights, their absmax scales in int8 per 256 blocks), the ``lorakit[quant]`` extra.

torchao moved ``NF4Tensor`` from ``torchao.dtypes.nf4tensor`` to ``torchao.quantization`` in 0.18; both
paths are read (0.11 to 0.18 checked). A weight whose element count is not a multiple of 64 · 256 cannot
be blocked and stays dense (``can_block``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.quantization.layer import QuantizedLinear

BLOCK_SIZE = 64  # weights per absmax scale (QLoRA's)
SCALER_BLOCK_SIZE = 256  # scales per double-quantization block (QLoRA's)
EXTRA_HINT = "pip install 'lorakit[quant]' (torchao)"


class MissingExtraError(ImportError):
    """torchao is not installed."""


def nf4_api() -> tuple[type, Any]:
    """(NF4Tensor, to_nf4) from whichever path the installed torchao has."""
    try:
        from torchao.quantization import NF4Tensor, to_nf4  # torchao >= 0.18
    except ImportError:
        try:
            from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4  # torchao < 0.18
        except ImportError:
            raise MissingExtraError(f"model.quantize: nf4 needs torchao: {EXTRA_HINT}") from None
    return NF4Tensor, to_nf4


def can_block(shape: torch.Size | tuple[int, ...]) -> bool:
    numel = 1
    for n in shape:
        numel *= int(n)
    return numel > 0 and numel % (BLOCK_SIZE * SCALER_BLOCK_SIZE) == 0


def nf4_bytes(numel: int) -> int:
    """Bytes torchao's NF4 tensor holds for ``numel`` weights: 4 bits each, an int8 scale per block, a
    float32 factor per scaler block, the scales' mean and the 16-entry code table."""
    blocks = numel // BLOCK_SIZE
    return numel // 2 + blocks + 4 * (blocks // SCALER_BLOCK_SIZE) + 4 + 16 * 4


def _dequant(weight: torch.Tensor) -> torch.Tensor:
    return weight.get_original_weight()


class NF4Linear(QuantizedLinear):
    """A frozen linear map whose weight is torchao's NF4 tensor."""

    method = "nf4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        _, to_nf4 = nf4_api()
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        dense = weight.detach().contiguous()
        self.weight = nn.Parameter(to_nf4(dense, BLOCK_SIZE, SCALER_BLOCK_SIZE), requires_grad=False)

    def stored(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,)

    dequant_fn = staticmethod(_dequant)

    def weight_bytes(self) -> int:
        names, _ = self.weight.__tensor_flatten__()
        return sum(getattr(self.weight, n).numel() * getattr(self.weight, n).element_size() for n in names)
