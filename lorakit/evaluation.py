"""Evaluation: predictions over an evaluation set, gathered across processes, scored by the task.

Classification takes the arg-max class, regression the single output, multilabel every class whose logit
is above 0; generation decodes with beam search (or greedy with ``num_beams: 1``) and scores the text, and
for tasks with ``eval_loss`` also reports the loss and perplexity over the reference tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from lorakit.data.batching import in_row_order
from lorakit.data.loaders import EvalSet
from lorakit.data.tokenize import IGNORE_INDEX
from lorakit.tasks.base import Task


def metric_key(prefix: str, name: str) -> str:
    """``accuracy`` or, for a task with several evaluation splits, ``matched_accuracy``."""
    return f"{prefix}_{name}" if prefix else name


def _model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Labels stay out of the forward call: the model would compute a loss nobody reads.
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def predict_labels(model: nn.Module, loader: DataLoader, task: Task, accelerator: Accelerator) -> list[Any]:
    """Class ids (regression values; multi-hot rows for multilabel) for every row of ``loader``, in the
    loader's order, each row once."""
    model.eval()
    out: list[torch.Tensor] = []
    for batch in loader:
        logits = model(**_model_inputs(batch)).logits
        if task.kind == "regression":
            pred = logits.squeeze(-1).float()
        elif task.kind == "multilabel":
            pred = (logits > 0).long()  # sigmoid(logit) > 0.5
        else:
            pred = logits.argmax(-1)
        out.append(accelerator.gather_for_metrics(pred))
    return torch.cat(out).cpu().tolist() if out else []


@torch.no_grad()
def reference_loss(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """The mean next-token loss over every labelled token of ``loader`` (all batches and processes pooled,
    so each token weighs alike), and its perplexity."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in loader:
        logits = model(**_model_inputs(batch)).logits
        # Position t predicts token t + 1; the last position predicts nothing.
        labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
        losses = F.cross_entropy(
            logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        # Per row, gathered as predictions are: the copies that pad a process's last batch drop out.
        row_sums = accelerator.gather_for_metrics(losses.sum(1).double())
        row_tokens = accelerator.gather_for_metrics((labels != IGNORE_INDEX).sum(1))
        total += float(row_sums.sum())
        tokens += int(row_tokens.sum())
    loss = total / max(tokens, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))}


class _GeneratedNoRepeatNGram:
    """Bans a token that would repeat an n-gram of the generated text, ignoring the prompt.

    transformers' ``no_repeat_ngram_size`` also counts the prompt's n-grams for decoder-only models, so an
    E2E name of four tokens or a WikiSQL column could never be copied from the prompt. The LoRA authors'
    beam search (microsoft/LoRA ``examples/NLG/src/gpt2_beam.py``) bans n-grams of the generated tokens
    only; this does the same. Prompts are left-padded to one width, so the continuation starts at one
    column for every row.
    """

    def __init__(self, ngram_size: int, prompt_width: int) -> None:
        from transformers import NoRepeatNGramLogitsProcessor

        self.inner = NoRepeatNGramLogitsProcessor(ngram_size)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.inner(input_ids[:, self.prompt_width :], scores)


def _decoding_kwargs(generation: Any, tokenizer: Any, prompt_width: int) -> dict[str, Any]:
    """``generate`` keyword arguments for the recipe's ``generation`` section."""
    from transformers import LogitsProcessorList

    kwargs: dict[str, Any] = {
        "num_beams": generation.num_beams,
        "do_sample": False,
        "max_new_tokens": generation.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if generation.num_beams > 1:
        # Beam-only flags: transformers warns about them on every greedy call.
        kwargs.update(length_penalty=generation.length_penalty, early_stopping=True)
    if generation.no_repeat_ngram_size:
        kwargs["logits_processor"] = LogitsProcessorList(
            [_GeneratedNoRepeatNGram(generation.no_repeat_ngram_size, prompt_width)]
        )
    return kwargs


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    loader: DataLoader,
    tokenizer: Any,
    generation: Any,
    accelerator: Accelerator,
) -> list[str]:
    """Decoded continuations of the left-padded prompts in ``loader``, in row order, stripped.

    Decoding follows ``generation`` (a recipe's ``generation`` section): beam search with its length
    penalty, greedy when ``num_beams`` is 1, and ``no_repeat_ngram_size`` over the generated tokens only.
    """
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    texts: list[str] = []
    for batch in loader:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = unwrapped.generate(
            input_ids=ids, attention_mask=mask, **_decoding_kwargs(generation, tokenizer, ids.shape[1])
        )
        new = out[:, ids.shape[1] :]
        # Pad to a common width so that processes can gather tensors of one shape.
        new = accelerator.pad_across_processes(new, dim=1, pad_index=tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(accelerator.gather_for_metrics(new), skip_special_tokens=True)
        texts.extend(t.strip() for t in decoded)
    return texts


def evaluate(
    model: nn.Module,
    eval_sets: list[EvalSet],
    task: Task,
    accelerator: Accelerator,
    tokenizer: Any = None,
    generation: Any = None,
) -> tuple[dict[str, float], dict[str, list[Any]]]:
    """Metrics (keys prefixed per split where the task has several) and the predictions per split.

    The model runs in eval mode and is left in the mode the caller had it in."""
    was_training = model.training
    metrics: dict[str, float] = {}
    predictions: dict[str, list[Any]] = {}
    for es in eval_sets:
        if task.kind == "generation":
            preds: list[Any] = generate_texts(model, es.loader, tokenizer, generation, accelerator)
        else:
            preds = predict_labels(model, es.loader, task, accelerator)
        if len(preds) != len(es.rows):
            # Processes pad the last batches to equal shapes; gathering must drop exactly that padding.
            raise RuntimeError(
                f"{es.split}: {len(preds)} predictions for {len(es.rows)} rows, gathered across processes"
            )
        if es.order is not None:
            preds = in_row_order(preds, es.order)
        predictions[es.split] = preds
        scores = task.compute_metrics(preds, es.rows)
        if es.loss_loader is not None:
            scores = {**reference_loss(model, es.loss_loader, accelerator), **scores}
        for name, value in scores.items():
            metrics[metric_key(es.prefix, name)] = float(value)
    model.train(was_training)
    return metrics, predictions


def write_predictions(out_dir: Path, split: str, predictions: list[Any], rows: Any, task: Task) -> Path:
    """``predictions-<split>.jsonl``: one object a row (index, prediction, label name, label or
    references); returns its path.

    For E2E, also the official scorer's files beside it: ``predictions-<split>.txt`` (one output a line)
    and ``references-<split>.txt`` (each MR's references, a blank line between MRs), so that
    ``lorakit score e2e`` on them gives the metrics this evaluation reported.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"predictions-{split}.jsonl"
    has_references = "references" in rows.column_names
    lines = []
    for i, pred in enumerate(predictions):
        record: dict[str, Any] = {"row": i, "prediction": pred, "readable": task.readable(pred)}
        if "label" in rows.column_names:
            record["label"] = rows[i]["label"]
        if has_references:
            record["references"] = list(rows[i]["references"])
        lines.append(json.dumps(record, ensure_ascii=False))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    task.write_outputs(out_dir, split, predictions, rows)
    return path


def evaluate_run(
    run_dir: Path, split: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Evaluate a trained run on its task's evaluation splits (or ``split``); writes
    ``RUN_DIR/eval/metrics-<split>.json`` and ``predictions-<split>.jsonl`` and returns the metrics."""
    from lorakit.data.loaders import eval_sets
    from lorakit.models import load_trained, prompt_room
    from lorakit.recipe import load_trained_recipe
    from lorakit.runs import RECIPE_FILE, write_json
    from lorakit.tasks import build_task

    # The data stays (and is checked): --set task.data_dir=... points a run at data that has moved.
    recipe = load_trained_recipe(run_dir / RECIPE_FILE, overrides, keep_data=True)
    task = build_task(recipe.task)
    if split is not None:
        task.check_split(split)
    splits = {"": split} if split else task.eval_splits
    prepared = load_trained(run_dir, recipe, task)
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)
    room = prompt_room(prepared.model.config, recipe.generation.max_new_tokens)
    sets = eval_sets(recipe, task, prepared.tokenizer, splits, prompt_room=room)
    model = accelerator.prepare(prepared.model)
    for es in sets:
        es.prepare(accelerator)
    metrics, predictions = evaluate(model, sets, task, accelerator, prepared.tokenizer, recipe.generation)
    out_dir = run_dir / "eval"
    if accelerator.is_main_process:
        name = split or "+".join(task.eval_splits.values())
        write_json(out_dir / f"metrics-{name}.json", {"task": task.name, "split": name, **metrics})
        for es in sets:
            write_predictions(out_dir, es.split, predictions[es.split], es.rows, task)
    return metrics
