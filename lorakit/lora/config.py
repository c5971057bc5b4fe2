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

SliceLayout: TypeAlias = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class FusedLayout:
    """The output rows of a fused projection: ``groups`` repeats of ``slices`` ((name, rows) pairs, in
    order). One group is the contiguous layout (GPT-2's q|k|v; Phi-3's wide q then narrow k, v); several
    are a per-head layout: GPT-NeoX and BLOOM lay ``query_key_value`` out as num_heads groups of
    q|k|v (head_dim rows each), Falcon's newer models as num_kv_heads groups of (the group's q heads)|k|v.
    A slice's rows are then every group's share of it, and its B factor holds them group by group."""

    slices: SliceLayout
    groups: int = 1

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.slices)

    @property
    def width(self) -> int:
        """Rows of one group."""
        return sum(size for _, size in self.slices)

    def offset(self, name: str) -> int:
        """Where slice ``name`` starts within each group."""
        i = self.names.index(name)
        return sum(size for _, size in self.slices[:i])

    def rows_of(self, name: str) -> int:
        """All of slice ``name``'s rows: its share of every group."""
        return self.groups * dict(self.slices)[name]

    def rows(self, name: str) -> slice | list[int]:
        """The projection's output rows of slice ``name``, in the order its B factor holds them: a slice
        for one group, row indices (group by group) for several."""
        start, size = self.offset(name), dict(self.slices)[name]
        if self.groups == 1:
            return slice(start, start + size)
        return [g * self.width + start + j for g in range(self.groups) for j in range(size)]

    def as_record(self) -> dict[str, object]:
        """What an adapter file's metadata records of the layout (``groups`` only when more than one,
        so that files of one-group layouts read as they always have)."""
        record: dict[str, object] = {"slices": list(self.names), "sizes": [size for _, size in self.slices]}
        if self.groups > 1:
            record["groups"] = self.groups
        return record


# The output slices of a fused projection: names alone (equal contiguous slices, GPT-2's ("q", "k", "v")
# and every layout written before slices had sizes), (name, size) pairs (Phi-3's grouped-query q|k|v),
# or a FusedLayout (per-head layouts).
SliceSpec: TypeAlias = Sequence[str] | Sequence[tuple[str, int]] | FusedLayout


@dataclass
class LoraConfig:
    """What to adapt and how. ``target_modules``: module-name suffixes, one regular expression on full
    names, or ``"all-linear"`` (None is filled in outside the core: ``lorakit.families.lora_defaults`` gives
    the paper's choice for a Hugging Face model). ``fused_slices`` maps a module-name suffix to
    the output slices of that fused projection, in order: (name, rows) pairs (Phi-3 with grouped-query
    attention: ``{"qkv_proj": (("q", 3072), ("k", 1024), ("v", 1024))}``), names alone for equal slices
    (GPT-2: ``{"c_attn": ("q", "k", "v")}``), or a ``FusedLayout`` for one repeated per head."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # None: not resolved by the core (lorakit.families fills in the paper's choice); a str: ALL_LINEAR or
    # a regular expression.
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
    if isinstance(spec, FusedLayout):
        return spec.names
    return tuple(s if isinstance(s, str) else s[0] for s in spec)


def slice_layout(spec: SliceSpec, fan_out: int) -> FusedLayout:
    """The layout of a projection with ``fan_out`` output features. Names alone mean equal contiguous
    slices (the only layout before slices had sizes, so old adapter files keep their meaning); sizes must
    cover the output exactly, so a layout read from the wrong model fails here, not as misplaced rows."""
    groups = 1
    if isinstance(spec, FusedLayout):
        groups, spec = spec.groups, spec.slices
        if groups <= 0 or fan_out % groups:
            raise ValueError(f"{fan_out} output features do not split into {groups} equal groups")
        fan_out //= groups
    named = [isinstance(s, str) for s in spec]
    if any(named) and not all(named):
        raise ValueError(f"fused slices {list(spec)}: give names alone (equal slices) or (name, size) pairs")
    if all(named):
        names = tuple(spec)  # type: ignore[arg-type]
        if not names or fan_out % len(names):
            raise ValueError(f"{fan_out} output features do not split into {len(names)} equal slices")
        return FusedLayout(tuple((n, fan_out // len(names)) for n in names))
    layout = tuple((str(n), int(size)) for n, size in spec)  # type: ignore[misc]
    names = [n for n, _ in layout]
    if len(set(names)) != len(names) or any(size <= 0 for _, size in layout):
        raise ValueError(f"fused slices {list(layout)} need distinct names and positive sizes")
    covered = sum(size for _, size in layout)
    if covered != fan_out:
        has = f"each of its {groups} groups has" if groups > 1 else "the projection has"
        raise ValueError(f"fused slices {dict(layout)} cover {covered} rows; {has} {fan_out}")
    return FusedLayout(layout, groups)
