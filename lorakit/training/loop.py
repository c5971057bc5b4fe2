"""The training loop: Accelerate, AdamW over the trainable parameters, a warmup schedule, periodic
evaluation that keeps the best adapter, resumable checkpoints, and a run directory people can read.

One loop serves LoRA and full fine-tuning (the paper's baseline); only what is trainable differs. On
N processes each step trains on one global batch of N·batch_size rows split across them (see
``lorakit.sharding``), so N processes with batch b train the same weights as one with N·b; positions in
an epoch are counted in rows, so a run saved on N processes resumes on M.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn

from lorakit.data.loaders import DataReport, EvalSet, eval_sets, train_loader
from lorakit.errors import UserError
from lorakit.evaluation import evaluate, write_predictions
from lorakit.model_card import write_run_card
from lorakit.models import prepare_model, prompt_room
from lorakit.noise import deepspeed_in_use, without_deepspeed
from lorakit.recipe import Recipe, save_recipe
from lorakit.runs import METRICS_FILE, RECIPE_FILE, record_latest_run, write_json
from lorakit.tasks.base import Task
from lorakit.training import reporting, trackers, zero
from lorakit.training.checkpoint import (
    LoopState,
    latest_checkpoint,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
)
from lorakit.training.execution import compile_model, enable_gradient_checkpointing
from lorakit.training.optimization import build_optimizer, float32_trainables, global_mean_loss
from lorakit.training.preemption import StopSignals, interrupted, interrupted_at_the_end
from lorakit.training.preflight import check_precision, check_process_count, run_dir_for, settled_recipe
from lorakit.training.progress import TrainProgress
from lorakit.training.saving import save_trained
from lorakit.training.sharding import sliced_loader
from lorakit.training.whole_state import checkpoint_state, restore_state, whole_trainables

logger = logging.getLogger(__name__)

_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass
class TrainResult:
    """What ``train`` returns: where the run is and its summary metrics."""

    run_dir: Path
    metrics: dict[str, Any]
    main_process: bool = True  # False in the other processes of a multi-process run: they print nothing


def _improved(value: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (value > best if greater_is_better else value < best)


class _Loop:
    """State shared by the steps of one training run (kept in one place rather than 15 arguments)."""

    def __init__(self, recipe: Recipe, run_dir: Path, accelerator: Accelerator, task: Task) -> None:
        self.recipe, self.run_dir, self.acc, self.task = recipe, run_dir, accelerator, task
        t = recipe.train
        # Where a run's time goes, in metrics.json: start-up, model, data, steps, evaluation, saving.
        self.seconds: dict[str, float] = {"model": -time.perf_counter(), "evaluation": 0.0}
        with zero.whole_model_loading(accelerator):
            self.prepared = prepare_model(recipe, self.task)
        if t.mixed_precision != "no":
            float32_trainables(self.prepared.model)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(self.prepared.model)
        if t.compile:
            compile_model(self.prepared.model)
        tokenizer = self.prepared.tokenizer
        self.seconds["model"] += time.perf_counter()
        self.seconds["data"] = -time.perf_counter()
        n = accelerator.num_processes
        self.global_batch = t.batch_size * n
        # Rows are ordered and length-grouped at the global batch size, as one process with N·b would.
        self.data = DataReport()
        loader = train_loader(_with_batch_size(recipe, self.global_batch), self.task, tokenizer, self.data)
        self.train_dl = sliced_loader(loader, n, pin_memory=accelerator.device.type == "cuda")
        batches = self.train_dl.batch_sampler.num_global_batches()
        if batches == 0:
            raise UserError(
                f"fewer training rows than the {n} processes", recipe.where("train.num_processes")
            )
        room = prompt_room(self.prepared.model.config, recipe.generation.max_new_tokens)
        self.evals: list[EvalSet] = eval_sets(
            recipe, self.task, tokenizer, report=self.data, prompt_room=room
        )
        self.seconds["data"] += time.perf_counter()
        self.steps_per_epoch = math.ceil(batches / t.grad_accum)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        warmup = (
            t.warmup_steps if t.warmup_steps is not None else math.ceil(t.warmup_ratio * self.total_steps)
        )
        from transformers import get_scheduler

        optimizer = build_optimizer(self.prepared.model, t.lr, t.weight_decay)
        # Parameter names of each optimizer group, in order: checkpoints name Adam's state by them.
        names = {id(p): n for n, p in self.prepared.model.named_parameters()}
        self.layout = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        # The scheduler stays outside accelerator.prepare: prepared, it would step once per process.
        self.scheduler = get_scheduler(_SCHEDULERS[t.scheduler], optimizer, warmup, self.total_steps)
        zero.configure(accelerator, t)
        self.model, self.optimizer, self.train_dl = accelerator.prepare(
            self.prepared.model, optimizer, self.train_dl
        )
        for es in self.evals:
            es.prepare(accelerator)
        self.state = LoopState(global_batch_size=self.global_batch)
        self.log: reporting.JsonlLog | None = None  # the main process's, once the run directory exists

    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)

    def batches_done(self) -> int:
        """Global batches of the current epoch already trained on."""
        return math.ceil(self.state.samples_in_epoch / self.global_batch)

    def resume_from(self, ckpt: Path) -> None:
        """Weights, optimizer, scheduler, RNG and position of ``ckpt``, whatever its number of processes."""
        saved = read_checkpoint(ckpt)
        restore_state(self.acc, self.model, self.unwrapped(), self.optimizer, self.layout, ckpt, saved)
        self.scheduler.load_state_dict(saved.scheduler)
        self.state, rng = saved.loop, saved.rng
        # Dropout draws from the global generator; dataloaders have their own (see lorakit.data), so
        # restoring it here puts the next step exactly where the uninterrupted run was.
        restore_rng(rng)
        if self.state.global_batch_size != self.global_batch:
            # Rows are grouped into batches at the global size, so another size orders the epoch differently.
            logger.warning(
                "%s was trained with global batches of %d rows and resumes with %d: the rest of epoch %d "
                "skips about, not exactly, the rows already seen",
                ckpt,
                self.state.global_batch_size,
                self.global_batch,
                self.state.epoch,
            )
            self.state.global_batch_size = self.global_batch
        if self.batches_done() >= len(self.train_dl):  # saved on an epoch's last batch
            self.state.epoch += 1
            self.state.samples_in_epoch = 0

    def evaluate_and_keep_best(self) -> dict[str, float]:
        self.seconds["evaluation"] -= time.perf_counter()
        metrics, predictions = evaluate(
            self.model, self.evals, self.task, self.acc, self.prepared.tokenizer, self.recipe.generation
        )
        record = {"step": self.state.step, "epoch": self.state.epoch, **metrics}
        self.state.history.append(record)
        main = metrics[self.task.main_metric]
        if _improved(main, self.state.best_metric, self.task.greater_is_better):
            self.state.best_metric, self.state.best_step = main, self.state.step
            self.save_trained(self.run_dir)
            if self.acc.is_main_process:
                # The saved adapter's outputs, in the official scorer's formats for E2E.
                for es in self.evals:
                    write_predictions(
                        self.run_dir / "eval", es.split, predictions[es.split], es.rows, self.task
                    )
        if self.acc.is_main_process:
            trackers.log(self.acc, trackers.scalars(metrics, "eval"), self.state.step)
            self.log.write({"event": "eval", **record})
        self.seconds["evaluation"] += time.perf_counter()
        return metrics

    def save_trained(self, out_dir: Path) -> None:
        """The adapter (or model) into ``out_dir``, whole whatever the sharding; every process calls it."""
        with whole_trainables(self.acc, self.model, self.unwrapped()):
            if self.acc.is_main_process:
                save_trained(self.prepared, self.unwrapped(), self.recipe, self.task, out_dir)

    def checkpoint(self) -> None:
        self.acc.wait_for_everyone()
        weights, optimizer = checkpoint_state(
            self.acc, self.model, self.unwrapped(), self.optimizer, self.layout
        )
        if self.acc.is_main_process:
            save_checkpoint(self.run_dir, weights, optimizer, self.scheduler, self.state)
        self.acc.wait_for_everyone()


def _with_batch_size(recipe: Recipe, batch_size: int) -> Recipe:
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"batch_size": batch_size})})


def train(recipe: Recipe, resume: bool = False) -> TrainResult:
    """Train ``recipe`` into its output directory; with ``resume``, continue from the last checkpoint.

    Under a launcher (see ``lorakit.launch``) every process calls this; only the main one writes files.
    DeepSpeed stays unimported unless this process was launched to train under it (``lorakit.noise``).
    """
    startup = reporting.process_age_seconds()
    recipe, task = settled_recipe(recipe)
    trackers.check_installed(recipe)
    try:
        with without_deepspeed(needed=deepspeed_in_use()):
            return _train(recipe, task, resume, startup)
    finally:
        reporting.mark_run_end()


def _train(recipe: Recipe, task: Task, resume: bool, startup: float) -> TrainResult:
    t = recipe.train
    run_dir = run_dir_for(recipe, resume)
    set_seed(t.seed)
    acc = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        # Pinned training batches reach the GPU without the host waiting for queued steps to finish.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
        log_with=trackers.log_with(recipe, run_dir),
        project_dir=str(run_dir / "logs"),
        kwargs_handlers=zero.process_group_kwargs(),
    )
    check_process_count(recipe, acc.num_processes)
    check_precision(recipe, acc.device.type)
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak in metrics.json is this run's alone
    if not acc.is_main_process:
        reporting.quiet_libraries()
    # Every process has looked at the output directory before the main one starts filling it.
    acc.wait_for_everyone()
    # Model and data first: a bad row or a missing file stops the run before anything is written.
    loop = _Loop(recipe, run_dir, acc, task)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / RECIPE_FILE)
        record_latest_run(run_dir)
        loop.log = reporting.JsonlLog(run_dir)
    loop.seconds["start-up"] = startup
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        loop.resume_from(checkpoint)
    elif resume and acc.is_main_process:
        logger.warning("%s holds no checkpoint yet: training starts again from step 0", run_dir)
    trackers.start(acc, recipe, run_dir)
    try:
        with StopSignals() as signals:
            _train_epochs(loop, signals)
            result = _finish(loop)
    except BaseException:
        trackers.close(acc)  # an interrupted or failed run's trackers still get what was logged
        raise
    if signals.received is not None:  # after the last step: nothing left to stop, but the caller is told
        raise interrupted_at_the_end(signals.received, str(run_dir), tell=acc.is_main_process)
    return result


def _stop_requested(loop: _Loop, signals: StopSignals) -> int | None:
    """The signal that asked this run to stop, agreed by every process (all stop after the same step).
    With several processes that takes a collective, so they compare notes once per log interval only."""
    if loop.acc.num_processes == 1:
        return signals.received
    if loop.state.step % loop.recipe.train.log_every:
        return None
    received = torch.tensor(signals.received or 0, device=loop.acc.device)
    return int(loop.acc.reduce(received, "max").item()) or None


def _train_epochs(loop: _Loop, signals: StopSignals) -> None:
    """Run optimizer steps until the total is reached, or until a stop signal (then checkpoint, raise)."""
    acc, state, t = loop.acc, loop.state, loop.recipe.train
    model, n = loop.model, acc.num_processes
    params = [p for p in model.parameters() if p.requires_grad]
    running, running_batches = torch.zeros((), device=acc.device), 0
    model.train()
    with TrainProgress(loop.total_steps, enabled=acc.is_main_process, start=state.step) as progress:
        while state.step < loop.total_steps:
            loop.train_dl.set_epoch(state.epoch)
            done = loop.batches_done()
            # Resuming mid-epoch: the same order, minus what was consumed.
            batches = acc.skip_first_batches(loop.train_dl, done) if done else loop.train_dl
            tick = time.perf_counter()
            for batch in batches:
                rows = batch["input_ids"].shape[0]  # a shape, known on the host without a device sync
                with acc.accumulate(model):
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                    loss = global_mean_loss(logits, batch["labels"], loop.task.kind, t.label_smoothing, acc)
                    acc.backward(loss)
                    if acc.sync_gradients and t.max_grad_norm:
                        acc.clip_grad_norm_(params, t.max_grad_norm)
                    loop.optimizer.step()
                    loop.optimizer.zero_grad(set_to_none=True)
                running += loss.detach()
                running_batches += 1
                done += 1
                # Every process holds the same number of rows of each global batch (lorakit.sharding).
                state.samples_in_epoch += rows * n
                state.samples_seen += rows * n
                if not acc.sync_gradients:
                    continue
                if not loop.optimizer.step_was_skipped:  # fp16 loss scaling skips steps that overflowed
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
                        trackers.log(acc, {"train/loss": mean_loss, "train/lr": lr}, state.step)
                        loop.log.write({"event": "train", **record})
                    progress.update(
                        state.step, mean_loss, lr, state.samples_seen / max(state.train_seconds, 1e-9)
                    )
                eval_now = isinstance(t.eval_every, int) and state.step % t.eval_every == 0
                if eval_now:
                    state.train_seconds += time.perf_counter() - tick
                    loop.evaluate_and_keep_best()
                    tick = time.perf_counter()
                saved = (t.save_every and state.step % t.save_every == 0) or (eval_now and not t.save_every)
                if saved:
                    loop.checkpoint()
                if state.step >= loop.total_steps:
                    break
                if (signum := _stop_requested(loop, signals)) is not None:
                    if not saved:
                        loop.checkpoint()
                    where = str(latest_checkpoint(loop.run_dir))
                    source, main = loop.recipe.source, acc.is_main_process  # the main process tells
                    raise interrupted(signum, state.step, loop.total_steps, where, source, tell=main)
            state.train_seconds += time.perf_counter() - tick
            if done < len(loop.train_dl):
                break  # max_steps reached mid-epoch; _finish evaluates the final state
            state.epoch += 1
            state.samples_in_epoch = 0
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
    memory = reporting.peak_memory()
    if acc.num_processes > 1:
        # Each process has its own peak; the largest is what one device (or process) must hold.
        mine = torch.tensor([memory["peak_memory_bytes"]], device=acc.device)
        memory["peak_memory_bytes"] = int(acc.gather(mine).max().item())
    metrics = reporting.run_metrics(
        loop.recipe, task, state, evals, loop.prepared.counts, loop.data, loop.evals, acc.num_processes
    )
    metrics.update(memory)
    saving = time.perf_counter()
    loop.save_trained(loop.run_dir / "final")
    if acc.is_main_process:
        weights = loop.run_dir / ("adapter_model.safetensors" if loop.prepared.lora_config else "model")
        metrics["adapter_bytes"] = reporting.size_on_disk(weights)
        reporting.plot_curves(state.history, task.main_metric, loop.run_dir / "curves.png")
        # Saving: the final adapter and the plot (the best adapter's save counts in evaluation, mid-run
        # checkpoints in steps).
        metrics["seconds"] = {**loop.seconds, "steps": state.train_seconds}
        metrics["seconds"]["saving"] = time.perf_counter() - saving
        write_json(loop.run_dir / METRICS_FILE, metrics)
        write_run_card(loop.run_dir, loop.recipe, metrics)
        trackers.log_final(acc, metrics, state.step)
    # Every process leaves together (one tearing its process group down early aborted once under DeepSpeed).
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(run_dir=loop.run_dir, metrics=metrics, main_process=acc.is_main_process)
