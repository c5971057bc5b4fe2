"""``LoraConfig``: what to adapt and how, kept apart from the code that acts on it (as PEFT keeps its
``LoraConfig`` in ``tuners/lora/config.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

BIAS_CHOICES = ("none", "all", "lora_only")
# PEFT's shorthand for "every linear layer but the output head", compared case-insensitively as PEFT does.
# Checked before a string target is read as a regular expression: as a regex it would match nothing.
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """What to adapt and how. ``target_modules``: module-name suffixes, one regular expression on full
    names, ``"all-linear"``, or None for the paper's choice. ``fused_slices`` maps a module-name suffix to
    the names of the equal output slices of that fused projection (GPT-2: ``{"c_attn": ("q", "k", "v")}``)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # None: the paper's choice for the model type; a str: ALL_LINEAR or a regular expression.
    target_modules: Sequence[str] | str | None = None
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


def is_all_linear(target_modules: Sequence[str] | str | None) -> bool:
    """True when ``target_modules`` is PEFT's ``all-linear`` shorthand rather than a regex or a list."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
