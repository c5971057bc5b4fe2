"""Adapter files in PEFT's on-disk format.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's tensor names:
``base_model.model.<module>.lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r) — also for GPT-2's
Conv1D — ``...lora_embedding_A`` / ``...lora_embedding_B`` for embeddings, and saved modules (task
heads) and biases under their plain parameter path.

PEFT has no notion of LoRA on slices of a fused projection. A ``LoraFusedLinear`` with k adapted
slices of rank r is written as the one rank k·r LoRA it is equivalent to: A stacked, B
block-structured (slice i's rows, which differ in count under grouped-query attention and repeat per
head in a per-head layout, by its r columns), alpha scaled so that alpha'/r' keeps the scaling. The slice
layout (names, row counts per group, the number of groups when more than one, the adapted ones) goes in
the safetensors header metadata, which PEFT ignores and lorakit reads to split the pair back; a layout
without row counts (files written before they were recorded) means equal contiguous slices.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.lora.config import FusedLayout, SliceSpec
from lorakit.lora.files import (
    atomic_write,
    read_json_object,
    read_safetensors,
    read_safetensors_metadata,
    safetensors_bytes,
)
from lorakit.lora.heads import SavedModules
from lorakit.lora.inject import (
    LoraConfig,
    activated,
    active_adapter,
    adapter_parameter_names,
    inject_lora,
    is_lora_parameter,
    lora_modules,
    mark_trainable,
)
from lorakit.lora.layers import LoraEmbedding, LoraFusedLinear, LoraLinear, is_conv1d

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_FUSED_METADATA_KEY = "lorakit.fused_slices"


def _effective_rank_alpha(module: nn.Module) -> tuple[int, float]:
    """Rank and alpha of the single LoRA pair PEFT sees for this module."""
    if isinstance(module, LoraFusedLinear) and module.adapted:
        k = len(module.adapted)
        # alpha'/r' must equal alpha/r (or alpha'/sqrt(r') = alpha/sqrt(r) with rsLoRA).
        factor = math.sqrt(k) if module.use_rslora else k
        return module.r * k, module.alpha * factor
    return module.r, module.alpha


def _holding(model: nn.Module, adapter: str | None) -> dict[str, nn.Module]:
    """The LoRA layers that hold ``adapter`` (None: the active one), by path."""
    name = adapter if adapter is not None else active_adapter(model)
    return {p: m for p, m in lora_modules(model) if name in m.lora_adapters}


def _saved_tensors(model: nn.Module, config: LoraConfig, adapter: str | None) -> dict[str, torch.Tensor]:
    """Saved modules' and biases' tensors under their plain paths; a per-adapter head's (``SavedModules``)
    from the adapter's own copy, named as the module it stands for."""
    name = adapter if adapter is not None else active_adapter(model)
    heads = {p: m for p, m in model.named_modules() if isinstance(m, SavedModules)}
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for key in adapter_parameter_names(model, config.bias, config.modules_to_save):
        if is_lora_parameter(key):
            continue
        head = next((p for p in heads if key.startswith(p + ".")), None)
        if head is None:
            tensors[key] = params[key].detach()
        elif key.startswith(f"{head}.copies.{name}."):
            tensors[head + key[len(f"{head}.copies.{name}") :]] = params[key].detach()
    return tensors


def adapter_tensors(
    model: nn.Module, config: LoraConfig, adapter: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adapter ``adapter``'s tensors (None: the active one's) under PEFT's names, and the fused-slice
    layout for the file's metadata."""
    tensors = {PEFT_PREFIX + k: v for k, v in _saved_tensors(model, config, adapter).items()}
    fused: dict[str, Any] = {}
    with activated(model, adapter if adapter is not None else active_adapter(model)):
        for path, module in _holding(model, adapter).items():
            key = PEFT_PREFIX + path
            if isinstance(module, LoraEmbedding):
                tensors[key + ".lora_embedding_A"] = module.lora_embedding_A.detach()
                tensors[key + ".lora_embedding_B"] = module.lora_embedding_B.detach()
            elif isinstance(module, LoraFusedLinear) and module.adapted:
                with torch.no_grad():
                    tensors[key + ".lora_A.weight"] = module.stacked_a()
                    tensors[key + ".lora_B.weight"] = module.block_b(1.0)
                fused[path] = fused_layout(module)
            else:
                tensors[key + ".lora_A.weight"] = module.lora_A.detach()
                tensors[key + ".lora_B.weight"] = module.lora_B.detach()
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, fused


def fused_layout(module: LoraFusedLinear) -> dict[str, Any]:
    """What the file's metadata records of one fused projection: its slices in order with their row
    counts, the adapted ones, and the rank per slice. Files written before slices had sizes lack
    ``sizes``; they mean equal slices (``fused_slices_of``)."""
    return {**module.fused_layout.as_record(), "adapted": list(module.adapted), "r": module.r}


def fused_slices_of(layout: Mapping[str, Any]) -> SliceSpec:
    """A recorded layout as ``LoraConfig.fused_slices`` takes it: a ``FusedLayout`` for a per-head layout
    (``groups``), (name, size) pairs, or names alone (equal slices) for a file written before slices had
    sizes."""
    names, sizes, groups = layout["slices"], layout.get("sizes"), int(layout.get("groups", 1))
    if sizes is None:
        return tuple(names)
    if len(sizes) != len(names):
        raise ValueError(f"fused-slice layout {dict(layout)}: {len(names)} slices, {len(sizes)} sizes")
    pairs = tuple((str(n), int(d)) for n, d in zip(names, sizes, strict=True))
    return FusedLayout(pairs, groups) if groups != 1 else pairs


def _target_names(model: nn.Module, adapted: list[str]) -> list[str]:
    """Short names (``query``) when they pick out exactly the adapted modules, else full paths."""
    short = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    picked = {
        n
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in short
        and not n.endswith(".base_layer")
        and (
            isinstance(m, (nn.Linear, nn.Embedding, LoraLinear, LoraFusedLinear, LoraEmbedding))
            or is_conv1d(m)
        )
    }
    return short if picked == set(adapted) else sorted(adapted)


def _patterns(modules: dict[str, nn.Module], r: int, alpha: float) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT rank_pattern / alpha_pattern for modules whose rank or alpha differs from the global one,
    keyed by their short name when every module of that name agrees, else by full path."""
    by_short: dict[str, set[tuple[int, float]]] = {}
    for path, module in modules.items():
        by_short.setdefault(path.rsplit(".", 1)[-1], set()).add(_effective_rank_alpha(module))
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for path, module in modules.items():
        rank, a = _effective_rank_alpha(module)
        short = path.rsplit(".", 1)[-1]
        key = short if len(by_short[short]) == 1 else path
        if rank != r:
            rank_pattern[key] = rank
        if a != alpha:
            alpha_pattern[key] = a
    return rank_pattern, alpha_pattern


def adapter_config_dict(
    model: nn.Module,
    config: LoraConfig,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    adapter: str | None = None,
) -> dict[str, Any]:
    """adapter_config.json's content (for adapter ``adapter``; None: the active one): what
    ``peft.LoraConfig`` reads."""
    modules = _holding(model, adapter)
    with activated(model, adapter if adapter is not None else active_adapter(model)):
        rank_pattern, alpha_pattern = _patterns(modules, config.r, config.alpha)
    saved = [n for n in config.modules_to_save]
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _target_names(model, list(modules)),
        "modules_to_save": saved or None,
        "fan_in_fan_out": any(getattr(m, "fan_in_fan_out", False) for m in modules.values()),
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "init_lora_weights": True if config.init == "kaiming" else "gaussian",
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
    }


def fused_metadata(fused: Mapping[str, Any]) -> dict[str, str] | None:
    """The safetensors header entry that records fused-slice layouts (None when there are none)."""
    return {_FUSED_METADATA_KEY: json.dumps(dict(fused))} if fused else None


def write_adapter_files(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    config_dict: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an adapter directory from ready tensors and config (both files atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    data = safetensors_bytes(dict(tensors), meta)  # the same bytes for the same adapter, run after run
    atomic_write(out / WEIGHTS_NAME, lambda p: Path(p).write_bytes(data))

    def write_json(p: str) -> None:
        Path(p).write_text(json.dumps(dict(config_dict), indent=2, sort_keys=True) + "\n")

    atomic_write(out / CONFIG_NAME, write_json)
    return out


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    config: LoraConfig,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    adapter: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save the model's LoRA adapter ``adapter`` (None: the active one) with its saved modules and biases
    in PEFT's format; returns the dir. ``metadata``: more safetensors header entries (PEFT ignores them;
    lorakit records its task's label names there)."""
    tensors, fused = adapter_tensors(model, config, adapter)
    cfg = adapter_config_dict(model, config, base_model_name_or_path, task_type, adapter)
    meta = {**(fused_metadata(fused) or {}), **(metadata or {})}
    return write_adapter_files(out_dir, tensors, cfg, meta or None)


def read_adapter_metadata(adapter_dir: str | Path) -> dict[str, str]:
    """The safetensors header entries of an adapter directory's weights file (no tensors are read)."""
    return read_safetensors_metadata(Path(adapter_dir) / WEIGHTS_NAME)


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(config dict, tensors with PEFT's prefix removed, fused-slice layout) of an adapter directory;
    BrokenFileError naming the file that is missing or broken."""
    d = Path(adapter_dir)
    config = read_json_object(d / CONFIG_NAME)
    raw, metadata = read_safetensors(d / WEIGHTS_NAME)
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in raw.items()}
    fused = json.loads(metadata.get(_FUSED_METADATA_KEY, "{}"))
    return config, tensors, fused


def _lora_paths(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Module path -> 'linear' | 'embedding' for every LoRA pair in the file."""
    paths = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            paths[key[: -len(".lora_A.weight")]] = "linear"
        elif key.endswith(".lora_embedding_A"):
            paths[key[: -len(".lora_embedding_A")]] = "embedding"
    return paths


def config_from_file(
    file_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], fused: Mapping[str, Any]
) -> LoraConfig:
    """A LoraConfig that re-creates exactly the modules of a file: targets by full path, each with its
    rank from the tensor shapes and its alpha from PEFT's alpha_pattern rules."""
    r, alpha = int(file_config["r"]), float(file_config["lora_alpha"])
    rslora = bool(file_config.get("use_rslora", False))
    targets, ranks, alphas, fused_slices = [], {}, {}, {}
    for path, kind in _lora_paths(tensors).items():
        a = tensors[path + (".lora_A.weight" if kind == "linear" else ".lora_embedding_A")]
        rank = int(a.shape[0])
        short = path.rsplit(".", 1)[-1]
        pattern = file_config.get("alpha_pattern") or {}
        a_eff = float(pattern.get(path, pattern.get(short, alpha)))
        if path in fused:
            k = len(fused[path]["adapted"])
            rank, a_eff = rank // k, a_eff / (math.sqrt(k) if rslora else k)
            fused_slices[path] = fused_slices_of(fused[path])
            targets.append(f"{path}[{','.join(fused[path]['adapted'])}]")
        else:
            targets.append(path)
        ranks[path], alphas[path] = rank, a_eff
    lora_keys = {k for k in tensors if is_lora_parameter(k)}
    saved = sorted(
        {
            m
            for m in (file_config.get("modules_to_save") or [])
            if any(k.startswith(m + ".") or f".{m}." in k for k in tensors if k not in lora_keys)
        }
    )
    init = file_config.get("init_lora_weights", True)
    return LoraConfig(
        r=r,
        alpha=alpha,
        dropout=float(file_config.get("lora_dropout", 0.0)),
        target_modules=targets,
        bias=file_config.get("bias", "none"),
        modules_to_save=saved,
        init="gaussian" if init == "gaussian" else "kaiming",
        use_rslora=rslora,
        fused_slices=fused_slices,
        rank_pattern=ranks,
        alpha_pattern=alphas,
    )


@torch.no_grad()
def copy_lora_weights(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], adapter: str | None = None
) -> set[str]:
    """Copy a file's LoRA pairs into the active adapter of each layer holding ``adapter`` (None: every
    LoRA layer); returns the keys used. Shapes must fit exactly."""
    used = set()
    for path, module in lora_modules(model):
        if adapter is not None and adapter not in module.lora_adapters:
            continue
        if isinstance(module, LoraEmbedding):
            pairs = [
                (module.lora_embedding_A, path + ".lora_embedding_A"),
                (module.lora_embedding_B, path + ".lora_embedding_B"),
            ]
        elif isinstance(module, LoraFusedLinear) and module.adapted:
            a, b = tensors[path + ".lora_A.weight"], tensors[path + ".lora_B.weight"]
            r = module.r
            expected = module.block_b(1.0).shape
            if tuple(b.shape) != tuple(expected) or a.shape[0] != r * len(module.adapted):
                raise ValueError(
                    f"{path}: adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit the model"
                )
            mask = torch.zeros_like(b, dtype=torch.bool)
            for i, name in enumerate(module.adapted):
                rows, cols = module.fused_layout.rows(name), slice(i * r, (i + 1) * r)
                module.lora_A[i].copy_(a[cols])
                module.lora_B[i].copy_(b[rows, cols])
                mask[rows, cols] = True
            if b[~mask].abs().max().item() if (~mask).any() else 0.0:
                raise ValueError(f"{path}: lora_B is not block-structured, so it is not a sliced LoRA")
            used |= {path + ".lora_A.weight", path + ".lora_B.weight"}
            continue
        else:
            pairs = [(module.lora_A, path + ".lora_A.weight"), (module.lora_B, path + ".lora_B.weight")]
        for param, key in pairs:
            if key not in tensors:
                raise ValueError(f"adapter file has no tensor {PEFT_PREFIX + key}")
            if tuple(param.shape) != tuple(tensors[key].shape):
                raise ValueError(
                    f"{key}: shape {tuple(tensors[key].shape)} in the file, {tuple(param.shape)} in the model"
                )
            param.copy_(tensors[key])
            used.add(key)
    return used


def load_adapter(
    model: nn.Module, adapter_dir: str | Path, keep: Callable[[str], bool] | None = None
) -> LoraConfig:
    """Load an adapter written by lorakit or PEFT into ``model``, in place; returns its LoraConfig.

    A model without LoRA layers gets them injected as the file describes; one that has them (injected
    from a recipe) must match the file exactly. Saved modules and biases are copied in as well.
    ``keep``: which of the file's tensors (named without PEFT's prefix) to load; the rest are ignored,
    as if the file did not hold them (a head of another label count, say).
    """
    file_config, tensors, fused = read_adapter(adapter_dir)
    if keep is not None:
        tensors = {k: v for k, v in tensors.items() if keep(k)}
    if file_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type {file_config.get('peft_type')!r} is not LORA")
    config = config_from_file(file_config, tensors, fused)
    present = {p for p, _ in lora_modules(model)}
    wanted = set(_lora_paths(tensors))
    if not present:
        inject_lora(model, config)
    elif present != wanted:
        raise ValueError(
            f"{adapter_dir}: adapter adapts {sorted(wanted - present) or 'the same'} modules the model "
            f"has no LoRA for, and lacks {sorted(present - wanted) or 'none'}"
        )
    used = copy_lora_weights(model, tensors)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if key in used:
                continue
            if key not in params:
                raise ValueError(f"{adapter_dir}: tensor {PEFT_PREFIX + key} names no parameter of the model")
            params[key].copy_(value)
    mark_trainable(model, config.bias, config.modules_to_save)
    return config
