"""A trained adapter as the per-module updates it applies, and the base weights they apply to.

An adapter directory (a lorakit run or a plain PEFT adapter) holds, per adapted module, A (r × in) and
B (out × r) under PEFT's names; the update the model applies is ΔW = (alpha/r)·B·A, laid out (out, in)
as for ``nn.Linear`` — GPT-2's Conv1D stores its own weight (in, out), so its W0 is transposed here to
match. A fused q|k|v projection adapted per slice is stored as one pair (A stacked, B block-structured,
the layout in the file's metadata); each adapted slice is split back out as its own module, named
``<module path>[q]``, with W0 the slice's rows of the fused weight. The slices' row counts come from the
metadata (Phi-3's k and v are narrower than q under grouped-query attention); a file written before they
were recorded has equal slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.errors import UserError
from lorakit.lora import CONFIG_NAME, WEIGHTS_NAME, LoraConfig, is_lora_parameter, lora_scaling, read_adapter
from lorakit.lora.adapter_io import config_from_file, fused_slices_of
from lorakit.lora.config import slice_layout
from lorakit.lora.low_rank import is_conv1d
from lorakit.runs import RECIPE_FILE

if TYPE_CHECKING:
    from lorakit.recipe import Recipe


@dataclass
class ModuleUpdate:
    """One adapted module (or fused slice): its factors as stored and the scale the model applies."""

    name: str  # the module path, or ``<module path>[slice]`` for a slice of a fused projection
    path: str  # the module path in the model (PEFT's key without its prefix and suffix)
    slice: str | None  # the slice's name in a fused projection, else None
    slice_index: int  # which of the fused output slices it is (0 for a whole module)
    slice_count: int  # how many slices the module's output splits into (1 for a whole module)
    kind: str  # "linear" or "embedding"
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float  # alpha/r (or alpha/sqrt(r) with rsLoRA), as applied
    # Where the slice's rows start in the module's output (within each group of a per-head layout), how
    # many rows the whole module has, and in how many equal groups: the slices may differ in size, so none
    # of this follows from slice_index and slice_count.
    row_start: int = 0
    module_rows: int = 0  # 0: the update's own row count (a whole module)
    groups: int = 1

    @property
    def rows(self) -> slice | list[int]:
        """The module's output rows this update writes, in its B factor's order (all of them for a whole
        module; row indices, group by group, for a slice of a per-head layout)."""
        size = int(self.b.shape[0]) // self.groups
        if self.groups == 1:
            return slice(self.row_start, self.row_start + size)
        width = self.module_rows // self.groups
        return [g * width + self.row_start + j for g in range(self.groups) for j in range(size)]

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> torch.Tensor:
        """ΔW = scale·B·A, (out × in), float64."""
        return self.scale * (self.b.double() @ self.a.double())


@dataclass
class AdapterSource:
    """An adapter directory read: its file config, tensors (PEFT prefix removed), fused layout, the
    per-module updates, and the run's recipe when there is one (None for a plain PEFT adapter)."""

    path: Path
    file_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    fused: dict[str, Any]
    lora: LoraConfig
    updates: list[ModuleUpdate]
    recipe: Recipe | None = None
    other_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # heads, biases: not LoRA


def _lora_pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str, str]]:
    """Module path -> (kind, A key, B key) for every LoRA pair in the file, in file order."""
    pairs = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            pairs[path] = ("linear", key, path + ".lora_B.weight")
        elif key.endswith(".lora_embedding_A"):
            path = key[: -len(".lora_embedding_A")]
            pairs[path] = ("embedding", key, path + ".lora_embedding_B")
    return pairs


def module_updates(
    lora: LoraConfig, tensors: dict[str, torch.Tensor], fused: dict[str, Any], where: str
) -> list[ModuleUpdate]:
    """The per-module (and per-slice) updates of a file; ``lora`` is ``config_from_file``'s reading of it
    (per-path ranks and alphas, fused ones already per slice)."""
    updates = []
    for path, (kind, a_key, b_key) in _lora_pairs(tensors).items():
        if b_key not in tensors:
            raise ValueError(f"{where}: {a_key} has no {b_key} beside it")
        a, b = tensors[a_key], tensors[b_key]
        r, alpha = int(lora.rank_pattern[path]), float(lora.alpha_pattern[path])
        scale = lora_scaling(alpha, r, lora.use_rslora)
        if path not in fused:
            updates.append(ModuleUpdate(path, path, None, 0, 1, kind, a, b, scale))
            continue
        adapted = list(fused[path]["adapted"])
        try:
            layout = slice_layout(fused_slices_of(fused[path]), int(b.shape[0]))
        except ValueError as err:
            raise ValueError(f"{where}: {path}'s shapes do not fit its fused-slice layout: {err}") from None
        names = layout.names
        if a.shape[0] != r * len(adapted) or any(n not in names for n in adapted):
            raise ValueError(f"{where}: {path}'s shapes do not fit its fused-slice layout {fused[path]}")
        for i, name in enumerate(adapted):
            cols = slice(i * r, (i + 1) * r)
            updates.append(
                ModuleUpdate(
                    f"{path}[{name}]",
                    path,
                    name,
                    names.index(name),
                    len(names),
                    kind,
                    a[cols],
                    b[layout.rows(name), cols],
                    scale,
                    row_start=layout.offset(name),
                    module_rows=int(b.shape[0]),
                    groups=layout.groups,
                )
            )
    if not updates:
        raise ValueError(f"{where}: the adapter holds no LoRA pairs")
    return updates


def open_adapter(path: Path, where: str = "RUN_DIR") -> AdapterSource:
    """Read a run's (or PEFT directory's) adapter; UserError for a path that holds none, BrokenFileError
    for a broken file, ValueError for an inconsistent one."""
    if not path.is_dir():
        raise UserError("not found (expected a lorakit run directory or a PEFT adapter directory)", str(path))
    if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
        full = (path / "model").is_dir()
        what = "a full fine-tuning run: there is no low-rank update" if full else "no adapter"
        raise UserError(f"{what} ({WEIGHTS_NAME} and {CONFIG_NAME})", str(path))
    file_config, tensors, fused = read_adapter(path)
    if file_config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"peft_type {file_config.get('peft_type')!r} is not LORA", str(path / CONFIG_NAME))
    lora = config_from_file(file_config, tensors, fused)
    updates = module_updates(lora, tensors, fused, str(path / WEIGHTS_NAME))
    recipe = None
    if (path / RECIPE_FILE).is_file():
        from lorakit.recipe import load_trained_recipe

        # Data and starting adapter may have moved since training; neither is needed to read weights.
        recipe = load_trained_recipe(path / RECIPE_FILE)
    other = {k: v for k, v in tensors.items() if not is_lora_parameter(k)}
    return AdapterSource(path, file_config, tensors, fused, lora, updates, recipe, other)


def _base_model(source: AdapterSource) -> nn.Module:
    """The base model the adapter was trained on: the recipe's (as ``lorakit eval`` builds it), or for a
    PEFT directory the ``base_model_name_or_path`` it records, with the Auto class of its task type."""
    from lorakit.models import HeadSpec, build_model, model_class

    if source.recipe is not None:
        from lorakit.tasks import build_task

        recipe = source.recipe
        return build_model(recipe, build_task(recipe.task))
    base = source.file_config.get("base_model_name_or_path")
    if not base:
        raise UserError("a PEFT adapter without a recipe or base_model_name_or_path", str(source.path))
    generation = source.file_config.get("task_type") == "CAUSAL_LM"
    spec = HeadSpec("generation" if generation else "classification", 0 if generation else 2)
    kwargs: dict[str, Any] = {} if generation else {"num_labels": 2, "ignore_mismatched_sizes": True}
    try:
        return model_class(spec).from_pretrained(base, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the base model {base!r}: {' '.join(str(exc).split())[:300]}") from None


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """A module's weight laid out (out, in): nn.Linear as stored, Conv1D and nn.Embedding transposed
    (an embedding maps a one-hot of num_embeddings to dim, as its LoRA pair does)."""
    w = module.weight.detach()
    return w.t() if is_conv1d(module) or isinstance(module, nn.Embedding) else w


def base_weights(source: AdapterSource) -> dict[str, torch.Tensor]:
    """W0 (out × in) of every update of ``source``, by update name, from its base model."""
    model = _base_model(source)
    weights = {}
    for update in source.updates:
        try:
            module = model.get_submodule(update.path)
        except AttributeError:
            raise ValueError(f"{source.path}: the base model has no module {update.path}") from None
        w = weight_out_in(module)
        if update.slice is not None:
            if w.shape[0] != update.module_rows:
                raise ValueError(
                    f"{update.name}: the base's {update.path} has {w.shape[0]} output rows, the adapter's "
                    f"{update.module_rows}: not the model the adapter was trained on"
                )
            w = w[update.rows]
        if tuple(w.shape) != (update.b.shape[0], update.a.shape[1]):
            raise ValueError(
                f"{update.name}: base weight {tuple(w.shape)} (out, in), update "
                f"{(update.b.shape[0], update.a.shape[1])}: not the model the adapter was trained on"
            )
        weights[update.name] = w.clone()
    del model
    return weights
