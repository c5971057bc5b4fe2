"""``LoraConfig``: what to adapt and how, kept apart from the code that acts on it (as PEFT keeps its
``LoraConfig`` in ``tuners/lora/config.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

BIAS_CHOICES = ("none", "all", "lora_only")
# PEFT's shorthand for "every linear layer but the output head", compared case-insensitively as PEFT does.
# Checked before a string target is read as a regular expression: as a regex it would match nothing.
ALL_LINEAR = "all-linear"

# The output slices of a fused projection, in order: names alone (equal slices, GPT-2's ("q", "k", "v")
# and every layout written before slices had sizes), or (name, size) pairs (Phi-3's grouped-query q|k|v).
SliceSpec: TypeAlias = Sequence[str] | Sequence[tuple[str, int]]
SliceLayout: TypeAlias = tuple[tuple[str, int], ...]


@dataclass
class LoraConfig:
    """What to adapt and how. ``target_modules``: module-name suffixes, one regular expression on full
    names, ``"all-linear"``, or None for the paper's choice. ``fused_slices`` maps a module-name suffix to
    the contiguous output slices of that fused projection, in order: (name, rows) pairs (Phi-3 with
    grouped-query attention: ``{"qkv_proj": (("q", 3072), ("k", 1024), ("v", 1024))}``), or names alone
    for equal slices (GPT-2: ``{"c_attn": ("q", "k", "v")}``)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # None: the paper's choice for the model type; a str: ALL_LINEAR or a regular expression.
    target_modules: Sequence[str] | str | None = None
    bias: str = "none"
    modules_to_save: Sequence[str] = ()
    init: str = "kaiming"
    use_rslora: bool = False
    fused_slices: Mapping[str, SliceSpec] = field(default_factory=dict)
    # Per-module overrides keyed by module-name suffix, as PEFT's rank_pattern / alpha_pattern.
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"bias must be one of {BIAS_CHOICES}, got {self.bias!r}")


def is_all_linear(target_modules: Sequence[str] | str | None) -> bool:
    """True when ``target_modules`` is PEFT's ``all-linear`` shorthand rather than a regex or a list."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def slice_names(spec: SliceSpec) -> tuple[str, ...]:
    """The slice names of a fused projection's layout, in order, whichever form it is given in."""
    return tuple(s if isinstance(s, str) else s[0] for s in spec)


def slice_layout(spec: SliceSpec, fan_out: int) -> SliceLayout:
    """(name, rows) per slice of a projection with ``fan_out`` output features. Names alone mean equal
    slices (the only layout before slices had sizes, so old adapter files keep their meaning); sizes must
    cover the output exactly, so a layout read from the wrong model fails here, not as misplaced rows."""
    named = [isinstance(s, str) for s in spec]
    if any(named) and not all(named):
        raise ValueError(f"fused slices {list(spec)}: give names alone (equal slices) or (name, size) pairs")
    if all(named):
        names = tuple(spec)  # type: ignore[arg-type]
        if not names or fan_out % len(names):
            raise ValueError(f"{fan_out} output features do not split into {len(names)} equal slices")
        return tuple((n, fan_out // len(names)) for n in names)
    layout = tuple((str(n), int(size)) for n, size in spec)  # type: ignore[misc]
    names = [n for n, _ in layout]
    if len(set(names)) != len(names) or any(size <= 0 for _, size in layout):
        raise ValueError(f"fused slices {list(layout)} need distinct names and positive sizes")
    covered = sum(size for _, size in layout)
    if covered != fan_out:
        raise ValueError(f"fused slices {dict(layout)} cover {covered} rows; the projection has {fan_out}")
    return layout
