"""Import of the LoRA authors' loralib checkpoints (microsoft/LoRA's NLU RoBERTa/DeBERTa releases:
``<module>.lora_A`` / ``.lora_B`` pairs and head weights) as PEFT-format adapter directories. loralib's
``MergedLinear`` checkpoints (its GPT-2 NLG releases) are refused."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.lora.adapter_io import PEFT_PREFIX, write_adapter_files


def convert_loralib_state_dict(
    state_dict: Mapping[str, torch.Tensor], alpha: float
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A loralib checkpoint (``<module>.lora_A`` / ``.lora_B`` with no ``.weight`` suffix, plus head
    weights) as PEFT-format tensors and config. Every tensor is kept, bit for bit."""
    tensors: dict[str, torch.Tensor] = {}
    ranks, targets, heads = set(), set(), set()
    for key, value in state_dict.items():
        if key.endswith((".lora_A", ".lora_B")):
            module = key.rsplit(".", 1)[0]
            tensors[f"{PEFT_PREFIX}{key}.weight"] = value
            targets.add(module.rsplit(".", 1)[-1])
            if key.endswith(".lora_A"):
                ranks.add(int(value.shape[0]))
                b = state_dict.get(module + ".lora_B")
                if b is None or b.shape[1] != value.shape[0]:
                    raise ValueError(
                        f"{module}: lora_A without a matching lora_B (loralib MergedLinear "
                        "checkpoints are not supported)"
                    )
        else:
            tensors[PEFT_PREFIX + key] = value
            heads.add(key.split(".", 1)[0])
    if len(ranks) != 1:
        raise ValueError(f"expected one LoRA rank in the checkpoint, found {sorted(ranks) or 'none'}")
    config = {
        "peft_type": "LORA",
        "r": ranks.pop(),
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "modules_to_save": sorted(heads) or None,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    return {k: v.contiguous() for k, v in tensors.items()}, config


def import_loralib_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    alpha: float,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "SEQ_CLS",
) -> Path:
    """Convert a loralib ``.bin``/``.pt`` checkpoint into a PEFT-format adapter directory.

    The file is read with ``torch.load(weights_only=True)``: no pickled code runs.
    """
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{checkpoint}: expected a state dict, found {type(state).__name__}")
    tensors, config = convert_loralib_state_dict(state, alpha)
    config.update(base_model_name_or_path=base_model_name_or_path, task_type=task_type)
    return write_adapter_files(out_dir, tensors, config)
