"""A recipe's data, ready for the loop: the tokenized training batches and the evaluation sets.

The task says how its rows become ids (``Task.encoding``); this module picks the encoder, turns a row that
cannot be encoded into one line naming its file and line, and counts rows cut at ``task.max_length``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader

from lorakit.data.batching import (
    PaddingCollator,
    build_eval_dataloader,
    build_train_dataloader,
    longest_first,
)
from lorakit.data.completions import RowError, tokenize_chat, tokenize_chat_prompts, tokenize_completions
from lorakit.data.tokenize import (
    subsample,
    tokenize_causal_lm,
    tokenize_classification,
    tokenize_prompts,
)
from lorakit.errors import UserError
from lorakit.recipe import Recipe
from lorakit.tasks.base import Task

logger = logging.getLogger(__name__)

# Task.encoding -> the encoder of its training rows (and of an evaluation loss).
_ENCODERS: dict[str, Callable[..., Any]] = {
    "classification": tokenize_classification,
    "causal_lm": tokenize_causal_lm,
    "completion": tokenize_completions,
    "chat": tokenize_chat,
}


@dataclass
class EvalSet:
    """One evaluation split: its rows (for the scorer), and the dataloader of its tokenized rows."""

    prefix: str  # "" for most tasks; "matched"/"mismatched" for MNLI
    split: str
    rows: Any  # datasets.Dataset in the task's row layout
    loader: DataLoader
    # The row of each prediction the loader yields (``None``: row order); ``in_row_order`` undoes it.
    order: list[int] | None = None
    # Teacher-forced batches of the references, for the loss and perplexity (tasks with ``eval_loss``).
    loss_loader: DataLoader | None = None

    def prepare(self, accelerator: Any) -> None:
        """Both loaders through ``accelerator.prepare``: on the model's device, sharded across processes."""
        self.loader = accelerator.prepare(self.loader)
        if self.loss_loader is not None:
            self.loss_loader = accelerator.prepare(self.loss_loader)


@dataclass
class DataReport:
    """What the data looked like, for metrics.json: rows per split and rows cut at ``task.max_length``."""

    rows: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)


def _rows(task: Task, split: str) -> Any:
    """The rows of ``split``; a UserError naming its file when there are none (a header alone, say)."""
    rows = task.load(split)
    if len(rows) == 0:
        raise UserError(f"no rows in the {split} split", where=task.source_of(split))
    return rows


def _encoded(
    task: Task, split: str, encode: Callable[..., Any], rows: Any, tokenizer: Any, max_length: int
) -> Any:
    """``encode`` over ``rows`` (cached), a bad row's error told at its file and line."""
    try:
        return encode(rows, tokenizer, max_length, cache=True)
    except RowError as exc:
        raise UserError(str(exc), task.row_where(split, exc.index)) from None
    except ValueError as exc:  # a tokenizer that cannot encode this task (no eos, no chat template)
        if type(exc) is not ValueError:
            raise
        raise UserError(str(exc), "model.tokenizer") from None


def _count_truncated(
    tokenized: Any, split: str, source: str, max_length: int, report: DataReport | None
) -> None:
    if "truncated" not in tokenized.column_names:
        return
    cut = int(sum(tokenized["truncated"]))
    if cut:
        logger.warning(
            "%s: %d of %d rows are longer than task.max_length (%d) and were cut, keeping their start",
            source,
            cut,
            len(tokenized),
            max_length,
        )
    if report is not None:
        report.truncated[split] = cut


def train_loader(recipe: Recipe, task: Task, tokenizer: Any, report: DataReport | None = None) -> DataLoader:
    """Shuffled (length-grouped unless the recipe says otherwise), dynamically padded training batches."""
    split, max_length = task.train_split, recipe.task.max_length
    rows = subsample(_rows(task, split), recipe.task.max_train_samples, recipe.train.seed)
    tokenized = _encoded(task, split, _ENCODERS[task.encoding], rows, tokenizer, max_length)
    _count_truncated(tokenized, split, task.source_of(split), max_length, report)
    if report is not None:
        report.rows[split] = len(tokenized)
    return build_train_dataloader(
        tokenized,
        PaddingCollator(tokenizer),
        recipe.train.batch_size,
        recipe.train.seed,
        recipe.train.group_by_length,
    )


def eval_sets(
    recipe: Recipe,
    task: Task,
    tokenizer: Any,
    splits: dict[str, str] | None = None,
    report: DataReport | None = None,
    prompt_room: int | None = None,
) -> list[EvalSet]:
    """The task's evaluation splits (or ``splits``: prefix -> split name), each with its loader.

    Classification batches rows longest first, which pads least; generation keeps row order and left-pads
    prompts, so that every row of a batch ends where generation starts and the texts are those ``lorakit
    generate`` gives. Tasks with ``eval_loss`` also get their references teacher-forced, for the loss.
    ``prompt_room``: the most prompt tokens the model's positions leave beside the generated ones.
    """
    sets = []
    max_length = recipe.task.max_length
    for prefix, split in (splits or task.eval_splits).items():
        rows = subsample(_rows(task, split), recipe.task.max_eval_samples, recipe.train.seed)
        order: list[int] | None = None
        loss_loader = None
        if task.kind == "generation":
            prompts = tokenize_chat_prompts if task.encoding == "chat" else tokenize_prompts
            room = min(max_length, prompt_room) if prompt_room else max_length
            tokenized = _encoded(task, split, prompts, rows, tokenizer, room)
            loader = build_eval_dataloader(
                tokenized, PaddingCollator(tokenizer, padding_side="left"), recipe.generation.batch_size
            )
            if task.eval_loss:
                references = _encoded(task, split, _ENCODERS[task.encoding], rows, tokenizer, max_length)
                _count_truncated(references, split, task.source_of(split), max_length, report)
                loss_loader = build_eval_dataloader(
                    references, PaddingCollator(tokenizer), recipe.train.eval_batch_size
                )
        else:
            tokenized = _encoded(task, split, tokenize_classification, rows, tokenizer, max_length)
            order = longest_first(tokenized)
            loader = build_eval_dataloader(
                tokenized, PaddingCollator(tokenizer), recipe.train.eval_batch_size, order
            )
        if report is not None:
            report.rows[split] = len(rows)
        sets.append(EvalSet(prefix, split, rows, loader, order, loss_loader))
    return sets
