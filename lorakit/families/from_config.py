"""Family knowledge that needs a model's config: the row layout of fused q|k|v projections, and how many
tokens a model's position table holds.

The table (``lorakit.families.spec``) names each family's fused projections and their slices, but not the
slices' sizes: under grouped-query attention they follow from the head counts of the checkpoint at hand
(Phi-3-mini's ``qkv_proj`` is 3072 | 3072 | 3072, Phi-3-medium's 5120 | 1280 | 1280), and a per-head
layout repeats q|k|v once per head (GPT-NeoX, BLOOM) or per key/value group (Falcon-40B). This module reads
them from a Hugging Face config by attribute and hands the core its plain data, a ``FusedLayout``:
``LoraConfig.fused_slices = {"qkv_proj": FusedLayout((("q", 5120), ("k", 1280), ("v", 1280)))}``. Every rule
was checked against the installed transformers' attention code on tiny models
(tests/test_fused_families.py, tests/test_interleaved_families.py).
"""

from __future__ import annotations

from lorakit.families.spec import HfConfig, family
from lorakit.lora import FusedLayout


def fused_slices(config: HfConfig) -> dict[str, FusedLayout]:
    """The fused q|k|v projections of a model with this config: module-name suffix -> its layout (the rows
    of each slice within a group, and how many groups). Empty for families without one."""
    spec = family(getattr(config, "model_type", None))
    if spec is None or spec.slice_rows is None:
        return {}
    rows, groups = spec.slice_rows(config)
    return {
        module: FusedLayout(tuple(zip(names, rows, strict=True)), groups)
        for module, names in spec.fused_slices.items()
    }


def position_limit(config: HfConfig) -> int | None:
    """How many tokens the model's absolute position table holds; None when it has none (relative
    positions only) or the config does not say."""
    spec = family(getattr(config, "model_type", None))
    flag = spec.absolute_positions_flag if spec is not None else None
    if flag is not None and not getattr(config, flag, True):
        return None  # relative positions only: no absolute table to run past
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(positions, int):
        return None
    if spec is not None and spec.positions_past_pad:
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1  # their positions start past the pad id
    return positions
