"""Quality at real training budgets (issue 26): the real pretrained MiniLM-L6 on five GLUE tasks with their
full training sets (SST-2: 8,000 rows), lorakit LoRA against lorakit full fine-tuning and against PEFT LoRA
trained by the Hugging Face Trainer.

    python scripts/bench_quality.py --out benchmarks        # `make bench-quality`; resumable

Everything lorakit trains goes through ``lorakit sweep`` (the product, in a subprocess): the learning-rate
grids (configs/sweeps/minilm-quality-lr-*.yaml, on STS-B training rows held out from training, never dev
rows), then the quality sweeps (configs/sweeps/minilm-quality.yaml and -seeds.yaml). Their point
directories are under benchmarks/quality/, where each finished point's metrics.json and recipe.yaml are
committed, so a rerun (this session's or the next one's) trains only what is missing. PEFT's runs read
their settings from the matching lorakit point's resolved recipe (rows, seed, tokenization, batch, epochs,
schedule, warmup, weight decay, clipping, heads), so the two cannot drift apart, and write one JSON each
under benchmarks/quality/peft/, skipped when present (main/: at PEFT's own pick, the protocol;
same-lr/: at lorakit LoRA's rate, beside it). The report (``bench_quality_report``) writes
benchmarks/quality.json, which ``bench_report`` renders into RESULTS.md with its targets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = ROOT / "configs" / "sweeps"
LR_SWEEPS = {
    "lorakit": SWEEPS / "minilm-quality-lr-lora.yaml",
    "full": SWEEPS / "minilm-quality-lr-full.yaml",
}
MAIN_SWEEPS = (SWEEPS / "minilm-quality.yaml", SWEEPS / "minilm-quality-seeds.yaml")
QUANT_SWEEP = SWEEPS / "minilm-quality-quant.yaml"
PEFT_DIR = ROOT / "benchmarks" / "quality" / "peft"
# PEFT's runs beside the quality sweeps (under PEFT_DIR): at PEFT's own pick, and at lorakit LoRA's rate.
PEFT_MAIN, PEFT_SAME_LR = "main-5ep", "same-lr-5ep"
# The grid's data: STS-B's training rows, HELDOUT_ROWS of them (a fixed seed) as the scored split.
GLUE = ROOT.parent / "shared" / "data" / "glue"
HELDOUT = ROOT / "runs" / "quality-data" / "STS-B-heldout"
HELDOUT_ROWS, HELDOUT_SEED = 1000, 12345


def heldout_folder(source: Path, rows: int, dest: Path, seed: int = HELDOUT_SEED) -> Path:
    """A copy of a GLUE task folder whose dev.tsv is ``rows`` lines of its train.tsv (a seeded draw) and
    whose train.tsv is the rest: tuning then scores on training rows alone, the dev set untouched."""
    header, *lines = (source / "train.tsv").read_text(encoding="utf-8").splitlines(True)
    held = set(np.random.default_rng(seed).permutation(len(lines))[:rows].tolist())
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "dev.tsv").write_text(header + "".join(x for i, x in enumerate(lines) if i in held), "utf-8")
    (dest / "train.tsv").write_text(
        header + "".join(x for i, x in enumerate(lines) if i not in held), "utf-8"
    )
    return dest


def lorakit_sweep(path: Path, only: list[str] | None = None) -> None:
    """``lorakit sweep PATH [--only NAME]...`` from the repository root (relative paths in the sweep files
    are from there), its latest-run pointer in a scratch home, so that the user's own ``lorakit eval``
    default is untouched."""
    from bench_common import scratch

    chosen = [a for name in only or [] for a in ("--only", name)]
    print(f"[quality] lorakit sweep {path} {' '.join(chosen)}", flush=True)
    with scratch():
        argv = [sys.executable, "-m", "lorakit", "sweep", str(path), *chosen]
        done = subprocess.run(argv, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"lorakit sweep {path} failed (exit {done.returncode})")


def sweep_points(path: Path) -> list[Any]:
    """The points of the sweep at ``path``, resolved as ``lorakit sweep`` resolves them (cwd: the root)."""
    from lorakit.analysis.sweep import load_sweep

    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        return load_sweep(path).points
    finally:
        os.chdir(cwd)


def run_peft(recipe: Any, lr: float, out_json: Path) -> dict[str, Any]:
    """PEFT LoRA through the Hugging Face Trainer with ``recipe``'s rows, model, LoRA settings and training
    settings but ``lr``; a dev evaluation after each epoch; the result is written to ``out_json``."""
    import peft
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from lorakit.data import subsample, tokenize_classification
    from lorakit.lora import count_parameters
    from lorakit.tasks import build_task

    start = time.perf_counter()
    cwd = Path.cwd()
    os.chdir(ROOT)  # the recipe's relative data_dir
    try:
        task = build_task(recipe.task)
        train_rows = subsample(task.load(task.train_split), recipe.task.max_train_samples, recipe.train.seed)
        dev = subsample(task.load("validation"), recipe.task.max_eval_samples, recipe.train.seed)
    finally:
        os.chdir(cwd)
    path = recipe.model.name_or_path
    if path.startswith("package:"):
        import importlib

        path = str(importlib.import_module(path.removeprefix("package:")).get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_tok = tokenize_classification(train_rows, tokenizer, recipe.task.max_length)
    dev_tok = tokenize_classification(dev, tokenizer, recipe.task.max_length)
    set_seed(recipe.train.seed)
    regression = task.kind == "regression"
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=task.num_labels,
        problem_type="regression" if regression else "single_label_classification",
    )
    lora = recipe.lora
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save),
    )
    model = peft.get_peft_model(model, config)
    curve: list[dict[str, float]] = []

    def score(prediction: Any) -> dict[str, float]:
        logits = np.asarray(prediction.predictions)
        preds = logits.reshape(-1) if regression else logits.argmax(-1)
        # Rows may come back in the Trainer's order: the metrics need only each prediction's own label.
        metrics = task.compute_metrics(
            preds.tolist(), {"label": np.asarray(prediction.label_ids).reshape(-1)}
        )
        curve.append(metrics)
        return metrics

    train = recipe.train
    args = TrainingArguments(
        output_dir=str(out_json.parent / f".{out_json.stem}-trainer"),
        num_train_epochs=train.epochs,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        learning_rate=lr,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_ratio,  # a float below 1: a ratio of the total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        train_sampling_strategy="group_by_length",  # lorakit's batches group by length too
        seed=train.seed,
        data_seed=train.seed,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_tok,
        eval_dataset=dev_tok,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=score,
    )
    fit = trainer.train()
    trainer.save_model(str(out_json.parent / f".{out_json.stem}-adapter"))
    wall = time.perf_counter() - start
    result = {
        "contender": "peft",
        "task": task.name,
        "seed": train.seed,
        "lr": lr,
        "main_metric": task.main_metric,
        "main": curve[-1][task.main_metric],
        "final": curve[-1],
        "curve": [c[task.main_metric] for c in curve],
        "trainable": count_parameters(model).trainable,
        "train_rows": len(train_rows),
        "train_seconds": fit.metrics["train_runtime"],
        "wall_seconds": wall,
        "optim": str(args.optim),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_json.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out_json)
    return result


def peft_runs(points: list[Any], lr: float | None, folder: Path) -> None:
    """PEFT for each LoRA point of ``points`` (at ``lr``, or the point's own), skipping finished ones."""
    import shutil

    for point in points:
        if point.recipe.method != "lora":
            continue
        rate = point.recipe.train.lr if lr is None else lr
        out = folder / f"{point.name}.json"
        if out.is_file():
            continue
        print(f"[quality] peft {point.name} lr {rate:g}", flush=True)
        result = run_peft(point.recipe, rate, out)
        print(f"[quality] peft {point.name}: {result['main']:.2f}", flush=True)
        for scratch in out.parent.glob(f".{out.stem}-*"):
            shutil.rmtree(scratch, ignore_errors=True)


def main_stage(picks: dict[str, float]) -> None:
    """The quality sweeps and PEFT beside them. Task by task, lorakit LoRA's point and then PEFT's run at
    its pick, back to back, so that the wall-time ratio compares runs minutes apart on the same machine
    rather than an hour apart (these machines' speed drifts by 20% over an hour); then full fine-tuning.
    Then the other seeds, and last PEFT at lorakit LoRA's rate (beside the targets, not one of them)."""
    main_sweep, *more = MAIN_SWEEPS
    points = sweep_points(main_sweep)
    for point in points:
        if point.recipe.method != "lora":
            continue
        lorakit_sweep(main_sweep, [point.name])
        peft_runs([point], picks["peft"], PEFT_DIR / PEFT_MAIN)
        task = point.recipe.task.name
        lorakit_sweep(main_sweep, [p.name for p in points if p.recipe.task.name == task])
    lorakit_sweep(main_sweep)  # nothing left to train: the sweep's tables, whole
    for path in more:
        lorakit_sweep(path)
    # Beside the protocol (each contender at its own pick), PEFT at lorakit LoRA's rate: the two
    # implementations at one setting, so that a gap from the rates is told apart from one of the code.
    peft_runs(points, picks["lorakit"], PEFT_DIR / PEFT_SAME_LR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    parser.add_argument(
        "--stage",
        choices=("grid", "main", "quant", "report", "all"),
        default="all",
        help="grid: the learning-rate grids; main: the quality sweeps and PEFT; quant: issue 27's nf4/int8 "
        "sweep; report: quality.json from what has finished; all: each in turn",
    )
    args = parser.parse_args()
    from bench_quality_report import check_picks, write_report

    stages = ("grid", "main", "quant", "report") if args.stage == "all" else (args.stage,)
    if "grid" in stages:
        heldout_folder(GLUE / "STS-B", HELDOUT_ROWS, HELDOUT)
        for path in LR_SWEEPS.values():
            lorakit_sweep(path)
        peft_runs(sweep_points(LR_SWEEPS["lorakit"]), None, PEFT_DIR / "lr-grid")
    if "main" in stages:
        main_stage(check_picks())  # the sweep files' rates are the grid's picks, or nothing trains
    if "quant" in stages:
        lorakit_sweep(QUANT_SWEEP)
    if "report" in stages:
        import bench_report

        print(f"[quality] wrote {write_report(args.out)} and {bench_report.render(args.out)}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "scripts"))
    main()
