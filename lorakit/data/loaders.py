"""A recipe's data, ready for the loop: the tokenized training batches and the evaluation sets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from lorakit.data import (
    PaddingCollator,
    build_eval_dataloader,
    build_train_dataloader,
    longest_first,
    subsample,
    tokenize_causal_lm,
    tokenize_classification,
    tokenize_prompts,
)
from lorakit.errors import UserError
from lorakit.recipe import Recipe
from lorakit.tasks.base import Task


@dataclass
class EvalSet:
    """One evaluation split: its rows (for the scorer), and the dataloader of its tokenized rows."""

    prefix: str  # "" for most tasks; "matched"/"mismatched" for MNLI
    split: str
    rows: Any  # datasets.Dataset in the task's row layout
    loader: DataLoader
    # The row of each prediction the loader yields (``None``: row order); ``in_row_order`` undoes it.
    order: list[int] | None = None


def _rows(task: Task, split: str) -> Any:
    """The rows of ``split``; a UserError naming its file when there are none (a header alone, say)."""
    rows = task.load(split)
    if len(rows) == 0:
        raise UserError(f"no rows in the {split} split", where=task.source_of(split))
    return rows


def train_loader(recipe: Recipe, task: Task, tokenizer: Any) -> DataLoader:
    """Shuffled (length-grouped unless the recipe says otherwise), dynamically padded training batches."""
    rows = subsample(_rows(task, task.train_split), recipe.task.max_train_samples, recipe.train.seed)
    if task.kind == "generation":
        tokenized = tokenize_causal_lm(rows, tokenizer, recipe.task.max_length, cache=True)
    else:
        tokenized = tokenize_classification(rows, tokenizer, recipe.task.max_length, cache=True)
    return build_train_dataloader(
        tokenized,
        PaddingCollator(tokenizer),
        recipe.train.batch_size,
        recipe.train.seed,
        recipe.train.group_by_length,
    )


def eval_sets(
    recipe: Recipe, task: Task, tokenizer: Any, splits: dict[str, str] | None = None
) -> list[EvalSet]:
    """The task's evaluation splits (or ``splits``: prefix -> split name), each with its loader.

    Classification batches rows longest first, which pads least; generation keeps row order and left-pads
    prompts, so that every row of a batch ends where generation starts and the texts are those ``lorakit
    generate`` gives.
    """
    sets = []
    for prefix, split in (splits or task.eval_splits).items():
        rows = subsample(_rows(task, split), recipe.task.max_eval_samples, recipe.train.seed)
        order: list[int] | None = None
        if task.kind == "generation":
            tokenized = tokenize_prompts(rows, tokenizer, recipe.task.max_length, cache=True)
            loader = build_eval_dataloader(
                tokenized, PaddingCollator(tokenizer, padding_side="left"), recipe.generation.batch_size
            )
        else:
            tokenized = tokenize_classification(rows, tokenizer, recipe.task.max_length, cache=True)
            order = longest_first(tokenized)
            loader = build_eval_dataloader(
                tokenized, PaddingCollator(tokenizer), recipe.train.eval_batch_size, order
            )
        sets.append(EvalSet(prefix=prefix, split=split, rows=rows, loader=loader, order=order))
    return sets
