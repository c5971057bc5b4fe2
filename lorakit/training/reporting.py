"""What a run leaves for people to read: the JSON-lines log, curves.png and the peak memory it records in
metrics.json (the run directory's file names and atomic writes are ``lorakit.runs``')."""

from __future__ import annotations

import json
import os
import resource
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lorakit.runs import LOG_FILE


class JsonlLog:
    """Appends one JSON object a line to ``logs/train.jsonl``; a crash loses at most the last line."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOG_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def run_metrics(
    recipe: Any,
    task: Any,
    state: Any,
    evals: list[dict[str, Any]],
    counts: Any,
    data: Any,
    eval_sets: list[Any],
    num_processes: int,
) -> dict[str, Any]:
    """metrics.json's summary of a finished run (peak memory, sizes and seconds are added by the loop):
    the best and final evaluations, the history, counts of rows and parameters, throughput."""
    final = {k: v for k, v in evals[-1].items() if k not in ("epoch",)}
    best = next(h for h in evals if h["step"] == state.best_step)
    metrics: dict[str, Any] = {
        "task": task.name,
        "method": recipe.method,
        "main_metric": task.main_metric,
        "best": {k: v for k, v in best.items() if k != "epoch"},
        "final": final,
        "history": state.history,
        "eval_examples": {es.prefix or es.split: len(es.rows) for es in eval_sets},
        # Rows per split, and rows cut at task.max_length (their start kept), for tasks that count them.
        "data": {"rows": data.rows, "truncated": data.truncated},
        "parameters": {**asdict(counts), "trainable_percent": counts.trainable_percent},
        "train_steps": state.step,
        "train_samples": state.samples_seen,
        "train_seconds": state.train_seconds,
        "train_samples_per_second": state.samples_seen / max(state.train_seconds, 1e-9),
        "num_processes": num_processes,
        "global_batch_size": state.global_batch_size,
    }
    if recipe.train.compile:
        from lorakit.training.execution import compile_report

        metrics["compile"] = compile_report()
    return metrics


_previous_run_end: float | None = None


def process_age_seconds() -> float:
    """Seconds since this process started (its interpreter start-up and imports, when asked first thing),
    or since the previous run in it ended: a sweep's points trained in one process each count their own
    start, not the points before them."""
    import time

    import psutil  # Accelerate's own dependency

    return time.time() - max(psutil.Process().create_time(), _previous_run_end or 0.0)


def mark_run_end() -> None:
    """A run in this process has ended: the next one's start-up is counted from now."""
    import time

    global _previous_run_end
    _previous_run_end = time.time()


def peak_memory() -> dict[str, Any]:
    """Peak memory of this process: CUDA max allocated on a GPU, max resident set size on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated()),
            "peak_memory_kind": "cuda_max_allocated",
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    factor = 1 if sys.platform == "darwin" else 1024
    return {"peak_memory_bytes": int(rss * factor), "peak_memory_kind": "cpu_max_rss"}


def plot_curves(history: list[dict[str, Any]], main_metric: str, path: Path) -> None:
    """curves.png: training loss and the main evaluation metric against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h[main_metric]) for h in history if main_metric in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if losses:
        ax1.plot(*zip(*losses, strict=True), color="tab:blue")
    ax1.set(title="training loss", xlabel="step", ylabel="loss")
    if evals:
        ax2.plot(*zip(*evals, strict=True), marker="o", color="tab:green")
    ax2.set(title=f"dev {main_metric}", xlabel="step", ylabel=main_metric)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def quiet_libraries() -> None:
    """Library warnings at error level only: the other processes of a multi-process run would repeat
    every warning the main one shows."""
    import logging

    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    logging.getLogger("lorakit").setLevel(logging.ERROR)
