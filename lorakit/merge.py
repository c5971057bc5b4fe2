"""Merging a run's adapter into its base model: W = W0 + (alpha/r)·B·A, saved as a plain HF model."""

from __future__ import annotations

import shutil
from pathlib import Path

from lorakit.errors import UserError
from lorakit.lora import unload_lora


def merge_run(run_dir: Path, out_dir: Path) -> Path:
    """Write ``out_dir``: the base model with the run's adapter merged in, and the tokenizer beside it.

    ``AutoModelFor….from_pretrained(out_dir)`` then loads an ordinary model (no LoRA layers, no extra
    latency) that gives the unmerged adapter's outputs. Written to a temporary directory and renamed.
    """
    from lorakit.models import load_trained
    from lorakit.recipe import load_recipe
    from lorakit.tasks import get_task

    recipe = load_recipe(run_dir / "recipe.yaml")
    if recipe.method != "lora":
        raise UserError(f"{run_dir} is a full fine-tuning run: its model/ directory is already a plain model")
    task = get_task(recipe.task.name, recipe.task.data_dir)
    prepared = load_trained(run_dir, recipe, task)
    model = unload_lora(prepared.model, merge=True)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    prepared.tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
