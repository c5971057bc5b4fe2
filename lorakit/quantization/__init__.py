"""A frozen base stored quantized (QLoRA): ``model.quantize: nf4 | int8``.

``quantize_model`` replaces the transformer blocks' linear layers by ``QuantizedLinear`` ones (int8 rows
with absmax scales, lorakit's own; or torchao's NF4, the ``lorakit[quant]`` extra); the LoRA core wraps
them like any base layer it cannot compute itself. Outside the torch-only core: ``lorakit.lora`` knows
nothing of quantization.
"""

from lorakit.quantization.int8 import Int8Linear, dequantize_rows, quantize_rows
from lorakit.quantization.layer import QuantizedLinear, QuantizedLinearFunction
from lorakit.quantization.nf4 import EXTRA_HINT, MissingExtraError, NF4Linear, can_block, nf4_bytes
from lorakit.quantization.walk import (
    QUANTIZE_CHOICES,
    QuantizeReport,
    base_weight_bytes,
    check_available,
    dense_layer,
    dequantize_model,
    merge_dense,
    quantizable,
    quantize_model,
    quantized_layers,
    quantized_size,
    refresh_ddp_ignore,
    restore_conv1d,
)

__all__ = [
    "EXTRA_HINT",
    "QUANTIZE_CHOICES",
    "Int8Linear",
    "MissingExtraError",
    "NF4Linear",
    "QuantizeReport",
    "QuantizedLinear",
    "QuantizedLinearFunction",
    "base_weight_bytes",
    "can_block",
    "check_available",
    "dense_layer",
    "dequantize_model",
    "dequantize_rows",
    "merge_dense",
    "nf4_bytes",
    "quantizable",
    "quantize_model",
    "quantize_rows",
    "quantized_layers",
    "quantized_size",
    "refresh_ddp_ignore",
    "restore_conv1d",
]
