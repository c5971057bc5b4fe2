"""Merging a run's adapter into its base model: W = W0 + (alpha/r)·B·A, saved as a plain HF model."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import UserError
from lorakit.lora import unload_lora
from lorakit.outputs import check_out, write_dir
from lorakit.runs import RECIPE_FILE, write_json

# Written into every merged directory: what makes a later merge into it a replacement, not a deletion.
MERGE_MARKER = "lorakit_merge.json"


def merge_run(run_dir: Path, out_dir: Path) -> Path:
    """Write ``out_dir``: the base model with the run's adapter merged in, and the tokenizer beside it.

    ``AutoModelFor….from_pretrained(out_dir)`` then loads an ordinary model (no LoRA layers, no extra
    latency) that gives the unmerged adapter's outputs. Written to a temporary directory and renamed; an
    existing ``out_dir`` is replaced only when it is an earlier merge (its ``lorakit_merge.json``), else
    refused: lorakit never deletes what it did not write.
    """
    from lorakit.model_card import write_merged_card
    from lorakit.models import load_trained
    from lorakit.recipe import load_trained_recipe
    from lorakit.tasks import build_task

    out_dir = Path(out_dir)
    check_out(out_dir, MERGE_MARKER, "merge")  # before anything loads
    # Merging needs the weights only: the run's data (and init_from) may have moved since training.
    recipe = load_trained_recipe(run_dir / RECIPE_FILE)
    if recipe.method != "lora":
        raise UserError(f"{run_dir} is a full fine-tuning run: its model/ directory is already a plain model")
    task = build_task(recipe.task)
    prepared = load_trained(run_dir, recipe, task)
    model = unload_lora(prepared.model, merge=True)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        prepared.tokenizer.save_pretrained(tmp)
        marker = {"lorakit": "merge", "merged_from": str(run_dir), "base": recipe.model.name_or_path}
        write_json(tmp / MERGE_MARKER, marker)
        write_merged_card(tmp, run_dir, recipe, out_dir.name)  # README.md: the Hub's model card

    write_dir(out_dir, fill)
    return out_dir
