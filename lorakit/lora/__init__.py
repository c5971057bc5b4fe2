"""The LoRA core: layers, injection, merging and adapter files. Depends on torch and safetensors only,
so it can be lifted out and used on any torch model, as loralib is."""

from lorakit.lora.adapter_io import (
    import_loralib_checkpoint,
    load_adapter,
    read_adapter,
    save_adapter,
)
from lorakit.lora.inject import (
    LoraConfig,
    ParameterCounts,
    TargetNotFoundError,
    count_parameters,
    find_targets,
    inject_lora,
    lora_modules,
    mark_trainable,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from lorakit.lora.layers import LoraEmbedding, LoraFusedLinear, LoraLinear, lora_scaling

__all__ = [
    "LoraConfig",
    "LoraEmbedding",
    "LoraFusedLinear",
    "LoraLinear",
    "ParameterCounts",
    "TargetNotFoundError",
    "count_parameters",
    "find_targets",
    "import_loralib_checkpoint",
    "inject_lora",
    "load_adapter",
    "lora_modules",
    "lora_scaling",
    "mark_trainable",
    "merge_lora",
    "read_adapter",
    "save_adapter",
    "unload_lora",
    "unmerge_lora",
]
