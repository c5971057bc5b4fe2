"""What lorakit knows of each Hugging Face model family, in one place, outside the LoRA core.

``spec.py`` holds one ``FamilySpec`` a ``config.model_type`` (``FAMILIES``), plain data: the paper's default
targets, the sequence-classification head, the classifier's output projection, the fused q|k|v
projections (contiguous, or repeated per head) and what the position table holds. ``from_config.py``
reads what depends on a checkpoint's config (slice sizes under grouped-query attention, per-head layouts,
the position limit); ``defaults.py`` completes a core ``LoraConfig`` for a model (``lora_defaults``). The core
(``lorakit.lora``) never imports this package: it is handed target names and ``fused_slices`` as data.
"""

from lorakit.families.defaults import check_slice_targets, lora_defaults
from lorakit.families.from_config import fused_slices, position_limit
from lorakit.families.spec import FAMILIES, FamilySpec, family, head_outputs, paper_targets, seq_cls_heads

__all__ = [
    "FAMILIES",
    "FamilySpec",
    "check_slice_targets",
    "family",
    "fused_slices",
    "head_outputs",
    "lora_defaults",
    "paper_targets",
    "position_limit",
    "seq_cls_heads",
]
