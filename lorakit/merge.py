"""Merging a run's adapter into its base model: W = W0 + (alpha/r)·B·A, saved as a plain HF model.

A run trained on a quantized base (``model.quantize: nf4 | int8``) merges into the dequantized W0: the
dense float32 ``dequant(W0) + s·BA``, the very model the run trained and evaluated (its outputs within
float rounding of the quantized model's); ``original_w0=True`` adds BA to the checkpoint's own W0 instead
(docs/quantization.md measures both).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lorakit.errors import UserError
from lorakit.outputs import check_out, write_dir
from lorakit.runs import RECIPE_FILE, write_json

# Written into every merged directory: what makes a later merge into it a replacement, not a deletion.
MERGE_MARKER = "lorakit_merge.json"


def merge_run(run_dir: Path, out_dir: Path, original_w0: bool = False) -> Path:
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
    prepared = load_trained(run_dir, recipe, task, quantize="none" if original_w0 else None)
    model = merge_model(prepared.model)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        prepared.tokenizer.save_pretrained(tmp)
        marker = {"lorakit": "merge", "merged_from": str(run_dir), "base": recipe.model.name_or_path}
        if recipe.model.quantize != "none":
            marker["quantize"] = recipe.model.quantize
            marker["w0"] = "original" if original_w0 else "dequantized"
        write_json(tmp / MERGE_MARKER, marker)
        write_merged_card(tmp, run_dir, recipe, out_dir.name)  # README.md: the Hub's model card

    write_dir(out_dir, fill)
    return out_dir


def merge_model(model: nn.Module) -> nn.Module:
    """``unload_lora(model, merge=True)``; a quantized base merges into its dequantized W0
    (``lorakit.quantization.merge_dense``)."""
    from lorakit.quantization import merge_dense

    return merge_dense(model)
