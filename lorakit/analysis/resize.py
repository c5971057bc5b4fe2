"""``lorakit resize``: each module's update replaced by its best rank-K approximation (Eckart–Young).

The update as applied, ΔW = s·B·A, is decomposed exactly (``spectra.low_rank_svd``), truncated to its
top K singular directions and factored back as B′ = U_K √Σ_K (out × K), A′ = √Σ_K V_Kᵀ (K × in). The new
adapter's alpha equals its rank, so the applied scale alpha′/K′ is 1 and (alpha′/K′)·B′A′ is exactly
the truncated ΔW. ``--rank K`` keeps min(K, r) directions everywhere (K ≥ r is lossless); ``--energy E``
keeps, per module, the fewest directions holding a share E of ‖ΔW‖_F², recorded in PEFT's
``rank_pattern``/``alpha_pattern``. A fused projection stores one rank for all its adapted slices, so
each slice is truncated on its own at the largest K any of its slices needs. Heads and biases are
copied unchanged. The output is a PEFT-format adapter with the run's recipe beside it (lora.r and
lora.alpha updated), and resize.json with each module's relative Frobenius error.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from lorakit.analysis import spectra
from lorakit.analysis.updates import AdapterSource, ModuleUpdate, open_adapter
from lorakit.errors import UserError
from lorakit.lora import PEFT_PREFIX, write_adapter_files
from lorakit.lora.adapter_io import fused_metadata
from lorakit.outputs import check_out, write_dir
from lorakit.runs import RECIPE_FILE, atomic_write_text, write_json

MARKER = "resize.json"


@dataclass
class ResizeResult:
    """Where the resized adapter went and resize.json's content."""

    out: Path
    data: dict[str, Any]


def default_out(run_dir: Path, rank: int | None, energy: float | None) -> Path:
    """``RUN_DIR-r{K}`` or ``RUN_DIR-e{E}`` beside the run."""
    run_dir = Path(run_dir)
    suffix = f"r{rank}" if rank is not None else f"e{energy:g}"
    return run_dir.with_name(f"{run_dir.name}-{suffix}")


def energy_rank(energies: torch.Tensor, share: float) -> int:
    """The fewest leading singular values whose energy reaches ``share`` (at least 1)."""
    # A hair of slack: a share of exactly 1.0 must not miss by a rounding error in the last place.
    if len(energies) == 0 or float(energies[-1]) == 0.0:
        return 1  # a zero update: one (zero) direction keeps all there is
    reached = (energies >= share - 1e-12).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(energies)


def _check_target(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise UserError("give exactly one of --rank K or --energy E", where="--rank/--energy")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be a positive integer, got {rank}", where="--rank")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UserError(f"--energy must be in (0, 1], got {energy}", where="--energy")


def _ranks(
    source: AdapterSource, svds: dict[str, spectra.Svd], rank: int | None, energy: float | None
) -> dict[str, int]:
    """The rank each module path keeps: fused slices share their module's (the largest they need)."""
    per_path: dict[str, int] = {}
    for u in source.updates:
        k = min(rank, u.rank) if rank is not None else energy_rank(spectra.energy(svds[u.name].s), energy)
        per_path[u.path] = max(per_path.get(u.path, 0), k)
    return per_path


def _factors(
    source: AdapterSource, svds: dict[str, spectra.Svd], keep: dict[str, int]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The new LoRA tensors (PEFT names without the prefix) and each update's record."""
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict[str, Any]] = {}
    by_path: dict[str, list[ModuleUpdate]] = {}
    for u in source.updates:
        by_path.setdefault(u.path, []).append(u)
    for path, updates in by_path.items():
        k = keep[path]
        pairs = []
        for u in updates:
            svd = svds[u.name]
            b_new, a_new = spectra.truncated_factors(svd, k)
            dtype = u.a.dtype
            b_new, a_new = b_new.to(dtype), a_new.to(dtype)
            delta = u.delta()
            fro = float(torch.linalg.matrix_norm(delta))
            err = float(torch.linalg.matrix_norm(delta - b_new.double() @ a_new.double()))
            records[u.name] = {
                "rank_before": u.rank,
                "rank": k,
                "relative_error": err / fro if fro > 0 else 0.0,
                "eckart_young_error": spectra.tail_error(svd.s, k),
                "energy_kept": float(spectra.energy(svd.s)[k - 1]) if fro > 0 else 1.0,
            }
            pairs.append((u, a_new, b_new))
        first = updates[0]
        if first.kind == "embedding":
            tensors[path + ".lora_embedding_A"] = pairs[0][1]
            tensors[path + ".lora_embedding_B"] = pairs[0][2]
        elif first.slice is None:
            tensors[path + ".lora_A.weight"] = pairs[0][1]
            tensors[path + ".lora_B.weight"] = pairs[0][2]
        else:
            # One pair for the fused module again: A stacked, B block-structured (lorakit.lora.adapter_io),
            # each slice's rows where the module has them (slices may differ in size: grouped-query k, v).
            block = first.b.new_zeros(first.module_rows, k * len(pairs))
            for i, (u, _, b_new) in enumerate(pairs):
                block[u.rows, i * k : (i + 1) * k] = b_new
            tensors[path + ".lora_A.weight"] = torch.cat([a for _, a, _ in pairs], 0)
            tensors[path + ".lora_B.weight"] = block
    return tensors, records


def _stored_rank(tensors: dict[str, torch.Tensor], path: str) -> int:
    """The rank of ``path``'s pair as PEFT sees it (a fused projection's slices stacked)."""
    key = path + ".lora_A.weight"
    return int(tensors[key if key in tensors else path + ".lora_embedding_A"].shape[0])


def _config(source: AdapterSource, stored: dict[str, int]) -> dict[str, Any]:
    """adapter_config.json: the source's, with the most common stored rank as r, alpha = r everywhere
    (scale 1), and full-path rank/alpha patterns for the modules that differ."""
    r = Counter(stored.values()).most_common(1)[0][0]
    config = dict(source.file_config)
    config.update(
        r=r,
        lora_alpha=r,
        use_rslora=False,
        rank_pattern={p: k for p, k in stored.items() if k != r},
        alpha_pattern={p: k for p, k in stored.items() if k != r},
    )
    return config


def _recipe_text(source: AdapterSource, r: int, out: Path) -> str | None:
    """The run's recipe with lora.r / lora.alpha set to the new adapter's (the YAML as written, so its
    data paths stay as the run had them), or None for a plain PEFT adapter."""
    path = source.path / RECIPE_FILE
    if not path.is_file():
        return None
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    lora = raw.setdefault("lora", {})
    lora.update(r=r, alpha=r, use_rslora=False)
    raw["output_dir"] = str(out)
    header = f"# lorakit recipe: {source.path}'s, resized by lorakit resize (lora.r, lora.alpha)\n"
    return header + yaml.safe_dump(raw, sort_keys=False, default_flow_style=False, allow_unicode=True)


def resize(
    run_dir: Path, rank: int | None = None, energy: float | None = None, out: Path | None = None
) -> ResizeResult:
    """Write ``run_dir``'s adapter truncated to rank ``rank`` (or to an ``energy`` share per module) into
    ``out`` (default ``RUN_DIR-r{K}`` / ``RUN_DIR-e{E}``); returns where and resize.json's content."""
    _check_target(rank, energy)
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else default_out(run_dir, rank, energy)
    if out.resolve() == run_dir.resolve():
        raise UserError("--out is the run itself: resize writes a new adapter beside it", where="--out")
    check_out(out, MARKER, "resize")
    source = open_adapter(run_dir, "RUN_DIR")
    svds = {u.name: spectra.low_rank_svd(u.b, u.a, u.scale) for u in source.updates}
    keep = _ranks(source, svds, rank, energy)
    lora_tensors, records = _factors(source, svds, keep)
    # The rank PEFT sees per module: k per adapted slice, stacked for a fused projection.
    stored = {p: _stored_rank(lora_tensors, p) for p in keep}
    config = _config(source, stored)
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in {**source.other_tensors, **lora_tensors}.items()}
    fused = {p: {**layout, "r": keep[p]} for p, layout in source.fused.items()}
    metadata = fused_metadata(fused)
    errors = [rec["relative_error"] for rec in records.values()]
    data = {
        "lorakit": "resize",
        "source": str(run_dir),
        "rank": rank,
        "energy": energy,
        "max_relative_error": max(errors),
        "mean_relative_error": sum(errors) / len(errors),
        "modules": records,
    }
    recipe = _recipe_text(source, config["r"], out)

    def fill(tmp: Path) -> None:
        write_adapter_files(tmp, tensors, config, metadata)
        if recipe is not None:
            atomic_write_text(tmp / RECIPE_FILE, recipe)
        write_json(tmp / MARKER, data)

    write_dir(out, fill)
    return ResizeResult(out, data)
