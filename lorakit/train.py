"""The training loop: Accelerate, AdamW over the trainable parameters, a warmup schedule, periodic
evaluation that keeps the best adapter, resumable checkpoints, and a run directory people can read.

One loop serves LoRA and full fine-tuning (the paper's baseline); only what is trainable differs.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from lorakit.checkpoint import LoopState, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from lorakit.data import IGNORE_INDEX
from lorakit.errors import UserError
from lorakit.evaluation import evaluate
from lorakit.loaders import EvalSet, eval_sets, train_loader
from lorakit.lora import save_adapter
from lorakit.models import PreparedModel, prepare_model
from lorakit.progress import TrainProgress
from lorakit.recipe import Recipe, save_recipe
from lorakit.reporting import JsonlLog, peak_memory, plot_curves, record_latest_run, write_json
from lorakit.tasks import get_task
from lorakit.tasks.base import Task

_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")


@dataclass
class TrainResult:
    """What ``train`` returns: where the run is and its summary metrics."""

    run_dir: Path
    metrics: dict[str, Any]


def task_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy (with label smoothing) for classes and next tokens, mean squared error for regression.

    Next-token loss counts the target tokens only: prompt positions carry IGNORE_INDEX labels.
    """
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    if kind == "generation":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only; no weight decay on biases and layer norms."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(_NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def _task_type(task: Task) -> str:
    return "CAUSAL_LM" if task.kind == "generation" else "SEQ_CLS"


def save_trained(prepared: PreparedModel, model: nn.Module, recipe: Recipe, task: Task, out_dir: Path) -> None:
    """The LoRA adapter in PEFT's format or, for full fine-tuning, the whole model with its tokenizer."""
    if prepared.lora_config is not None:
        save_adapter(model, out_dir, prepared.lora_config, recipe.model.name_or_path, _task_type(task))
        return
    target = out_dir / "model"
    tmp = out_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    prepared.tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _improved(value: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (value > best if greater_is_better else value < best)


class _Loop:
    """State shared by the steps of one training run (kept in one place rather than 15 arguments)."""

    def __init__(self, recipe: Recipe, run_dir: Path, accelerator: Accelerator) -> None:
        self.recipe, self.run_dir, self.acc = recipe, run_dir, accelerator
        self.task = get_task(recipe.task.name, recipe.task.data_dir)
        self.prepared = prepare_model(recipe, self.task)
        if recipe.train.gradient_checkpointing:
            # Non-reentrant checkpointing lets gradients reach LoRA weights even though every input to the
            # checkpointed blocks comes from frozen layers.
            self.prepared.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tokenizer = self.prepared.tokenizer
        self.train_dl = train_loader(recipe, self.task, tokenizer)
        self.evals: list[EvalSet] = eval_sets(recipe, self.task, tokenizer)
        t = recipe.train
        self.steps_per_epoch = math.ceil(len(self.train_dl) / (t.grad_accum * accelerator.num_processes))
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        warmup = t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * self.total_steps)
        from transformers import get_scheduler

        optimizer = build_optimizer(self.prepared.model, t.lr, t.weight_decay)
        # The scheduler stays outside accelerator.prepare: prepared, it would step once per process.
        self.scheduler = get_scheduler(_SCHEDULERS[t.scheduler], optimizer, warmup, self.total_steps)
        self.model, self.optimizer, self.train_dl = accelerator.prepare(self.prepared.model, optimizer, self.train_dl)
        for es in self.evals:
            es.loader = accelerator.prepare(es.loader)
        self.state = LoopState()
        self.log = JsonlLog(run_dir) if accelerator.is_main_process else None

    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)

    def evaluate_and_keep_best(self) -> dict[str, float]:
        metrics, _ = evaluate(
            self.model, self.evals, self.task, self.acc, self.prepared.tokenizer, self.recipe.generation
        )
        record = {"step": self.state.step, "epoch": self.state.epoch, **metrics}
        self.state.history.append(record)
        main = metrics[self.task.main_metric]
        if _improved(main, self.state.best_metric, self.task.greater_is_better):
            self.state.best_metric, self.state.best_step = main, self.state.step
            if self.acc.is_main_process:
                save_trained(self.prepared, self.unwrapped(), self.recipe, self.task, self.run_dir)
        if self.acc.is_main_process:
            self.acc.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.state.step)
            self.log.write({"event": "eval", **record})
        return metrics

    def checkpoint(self) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            save_checkpoint(self.run_dir, self.unwrapped(), self.optimizer, self.scheduler, self.state)
        self.acc.wait_for_everyone()


def _run_dir_for(recipe: Recipe, resume: bool) -> Path:
    run_dir = Path(recipe.output_dir)
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise UserError(f"no checkpoint to resume from in {run_dir / 'checkpoints'}", where="--resume")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --output-dir",
            where=recipe.where("output_dir"),
        )
    return run_dir


def train(recipe: Recipe, resume: bool = False) -> TrainResult:
    """Train ``recipe`` into its output directory; with ``resume``, continue from the last checkpoint."""
    t = recipe.train
    run_dir = _run_dir_for(recipe, resume)
    set_seed(t.seed)
    acc = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        log_with="tensorboard",
        project_dir=str(run_dir / "logs"),
    )
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        record_latest_run(run_dir)
    acc.init_trackers("tensorboard")
    loop = _Loop(recipe, run_dir, acc)
    if resume:
        ckpt = latest_checkpoint(run_dir)
        loop.state, rng = load_checkpoint(ckpt, loop.unwrapped(), loop.optimizer, loop.scheduler)
        # Dropout draws from the global generator; dataloaders have their own (see lorakit.data), so
        # restoring it here puts the next step exactly where the uninterrupted run was.
        restore_rng(rng)
        if loop.state.batches_in_epoch >= len(loop.train_dl):  # saved on an epoch's last batch
            loop.state.epoch += 1
            loop.state.batches_in_epoch = 0
    _train_epochs(loop)
    return _finish(loop)


def _train_epochs(loop: _Loop) -> None:
    """Run optimizer steps until the total is reached."""
    acc, state, t = loop.acc, loop.state, loop.recipe.train
    model = loop.model
    params = [p for p in model.parameters() if p.requires_grad]
    per_batch = t.batch_size * acc.num_processes
    running, running_batches = torch.zeros((), device=acc.device), 0
    model.train()
    with TrainProgress(loop.total_steps, enabled=acc.is_main_process, start=state.step) as progress:
        while state.step < loop.total_steps:
            loop.train_dl.set_epoch(state.epoch)
            batches = loop.train_dl
            if state.batches_in_epoch:  # resuming mid-epoch: the same order, minus what was consumed
                batches = acc.skip_first_batches(loop.train_dl, state.batches_in_epoch)
            tick = time.perf_counter()
            for batch in batches:
                with acc.accumulate(model):
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                    loss = task_loss(logits, batch["labels"], loop.task.kind, t.label_smoothing)
                    acc.backward(loss)
                    if acc.sync_gradients and t.max_grad_norm:
                        acc.clip_grad_norm_(params, t.max_grad_norm)
                    loop.optimizer.step()
                    loop.optimizer.zero_grad(set_to_none=True)
                running += loss.detach()
                running_batches += 1
                state.batches_in_epoch += 1
                state.samples_seen += per_batch
                if not acc.sync_gradients:
                    continue
                loop.scheduler.step()
                state.step += 1
                if state.step % t.log_every == 0 or state.step == loop.total_steps:
                    # The only host synchronisation of the hot loop, once per log interval.
                    mean_loss = acc.reduce(running / running_batches, "mean").item()
                    running, running_batches = torch.zeros((), device=acc.device), 0
                    now = time.perf_counter()
                    state.train_seconds += now - tick
                    tick = now
                    lr = loop.scheduler.get_last_lr()[0]
                    record = {"step": state.step, "epoch": state.epoch, "loss": mean_loss, "lr": lr}
                    state.history.append(record)
                    if acc.is_main_process:
                        acc.log({"train/loss": mean_loss, "train/lr": lr}, step=state.step)
                        loop.log.write({"event": "train", **record})
                    progress.update(state.step, mean_loss, lr, state.samples_seen / max(state.train_seconds, 1e-9))
                eval_now = isinstance(t.eval_every, int) and state.step % t.eval_every == 0
                if eval_now:
                    state.train_seconds += time.perf_counter() - tick
                    loop.evaluate_and_keep_best()
                    tick = time.perf_counter()
                if (t.save_every and state.step % t.save_every == 0) or (eval_now and not t.save_every):
                    loop.checkpoint()
                if state.step >= loop.total_steps:
                    break
            state.train_seconds += time.perf_counter() - tick
            if state.batches_in_epoch < len(loop.train_dl):
                break  # max_steps reached mid-epoch; _finish evaluates the final state
            state.epoch += 1
            state.batches_in_epoch = 0
            if t.eval_every == "epoch":
                loop.evaluate_and_keep_best()
                if not t.save_every:
                    loop.checkpoint()


def _finish(loop: _Loop) -> TrainResult:
    acc, state, task = loop.acc, loop.state, loop.task
    evals = [h for h in state.history if task.main_metric in h]
    if not evals or evals[-1]["step"] != state.step:
        loop.evaluate_and_keep_best()
        evals = [h for h in state.history if task.main_metric in h]
    final = {k: v for k, v in evals[-1].items() if k not in ("epoch",)}
    best = next(h for h in evals if h["step"] == state.best_step)
    counts = loop.prepared.counts
    metrics: dict[str, Any] = {
        "task": task.name,
        "method": loop.recipe.method,
        "main_metric": task.main_metric,
        "best": {k: v for k, v in best.items() if k != "epoch"},
        "final": final,
        "history": state.history,
        "eval_examples": {es.prefix or es.split: len(es.rows) for es in loop.evals},
        "parameters": {**asdict(counts), "trainable_percent": counts.trainable_percent},
        "train_steps": state.step,
        "train_samples": state.samples_seen,
        "train_seconds": state.train_seconds,
        "train_samples_per_second": state.samples_seen / max(state.train_seconds, 1e-9),
        "num_processes": acc.num_processes,
        **peak_memory(),
    }
    if acc.is_main_process:
        final_dir = loop.run_dir / "final"
        save_trained(loop.prepared, loop.unwrapped(), loop.recipe, task, final_dir)
        weights = loop.run_dir / ("adapter_model.safetensors" if loop.prepared.lora_config else "model")
        metrics["adapter_bytes"] = _size_on_disk(weights)
        write_json(loop.run_dir / "metrics.json", metrics)
        plot_curves(state.history, task.main_metric, loop.run_dir / "curves.png")
    acc.end_training()
    return TrainResult(run_dir=loop.run_dir, metrics=metrics)


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
