"""``LoraConfig``: what to adapt and how, kept apart from the code that acts on it (as PEFT keeps its
``LoraConfig`` in ``tuners/lora/config.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """What to adapt and how. ``fused_slices`` maps a module-name suffix to the names of the equal
    output slices of that fused projection (GPT-2: ``{"c_attn": ("q", "k", "v")}``)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Sequence[str] | str | None = None  # None: the paper's choice for the model type
    bias: str = "none"
    modules_to_save: Sequence[str] = ()
    init: str = "kaiming"
    use_rslora: bool = False
    fused_slices: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # Per-module overrides keyed by module-name suffix, as PEFT's rank_pattern / alpha_pattern.
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
