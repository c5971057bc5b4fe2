"""Merging a run's adapter into its base model: W = W0 + (alpha/r)·B·A, saved as a plain HF model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lorakit.errors import UserError
from lorakit.lora import unload_lora
from lorakit.runs import write_json

# Written into every merged directory: what makes a later merge into it a replacement, not a deletion.
MERGE_MARKER = "lorakit_merge.json"


def merge_run(run_dir: Path, out_dir: Path) -> Path:
    """Write ``out_dir``: the base model with the run's adapter merged in, and the tokenizer beside it.

    ``AutoModelFor….from_pretrained(out_dir)`` then loads an ordinary model (no LoRA layers, no extra
    latency) that gives the unmerged adapter's outputs. Written to a temporary directory and renamed; an
    existing ``out_dir`` is replaced only when it is an earlier merge (its ``lorakit_merge.json``), else
    refused: lorakit never deletes what it did not write.
    """
    from lorakit.models import load_trained
    from lorakit.recipe import load_recipe
    from lorakit.tasks import get_task

    out_dir = Path(out_dir)
    _check_out(out_dir)  # before anything loads
    recipe = load_recipe(run_dir / "recipe.yaml")
    if recipe.method != "lora":
        raise UserError(f"{run_dir} is a full fine-tuning run: its model/ directory is already a plain model")
    task = get_task(recipe.task.name, recipe.task.data_dir)
    prepared = load_trained(run_dir, recipe, task)
    model = unload_lora(prepared.model, merge=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name beside the target: nothing of the user's is ever reused as scratch space.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        prepared.tokenizer.save_pretrained(tmp)
        write_json(tmp / MERGE_MARKER, {"merged_from": str(run_dir), "base": recipe.model.name_or_path})
        if out_dir.exists():  # an earlier merge (checked above): out of the way, then the new one in
            old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
            out_dir.rename(old)
            try:
                tmp.rename(out_dir)
            except OSError:
                old.rename(out_dir)  # the earlier merge back in place: nothing lost
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check_out(out_dir: Path) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty directory lorakit's merge did not write."""
    if out_dir.is_file():
        raise UserError(f"{out_dir} is a file, not a directory", where="--out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MERGE_MARKER).is_file():
        raise UserError(
            f"{out_dir} holds files lorakit did not write (no {MERGE_MARKER}): "
            "choose an empty or new directory",
            where="--out",
        )
