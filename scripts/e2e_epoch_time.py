"""How long an E2E training epoch takes: LoRA training speed on real E2E rows, in seconds per 1,000 examples.

The paper's GPT-2 M setting (Table 11): r = 4 on the q and v slices of GPT-2's fused ``c_attn``, alpha 32,
LoRA dropout 0.1, label smoothing 0.1, AdamW, batch 8, sequences cut at 512 tokens and padded per batch
(length-grouped, as ``lorakit train`` batches them). The model has gpt2-medium's shape (and, for scale,
gpt2 small's) with random weights: no download, and the values of the weights do not change the cost.
The rows are the first N of the real ``trainset.csv``, tokenized with the real GPT-2 tokenizer and turned
into prompt/target pairs by lorakit's E2E task, so the sequence lengths are the real ones.

One untimed step first (AdamW's state, kernel caches), then one timed pass over the N rows. The projected
epoch is the figure scaled to E2E's 42,061 training pairs.

    python scripts/e2e_epoch_time.py --rows 64 --out benchmarks/e2e_epoch_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
E2E_TRAIN_PAIRS = 42061  # the original release's trainset.csv (and the LoRA repo's train.txt)
SHAPES: dict[str, dict[str, int]] = {
    "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
    "gpt2": {"n_embd": 768, "n_layer": 12, "n_head": 12},
}
# The paper's setting, as configs/gpt2-medium-e2e-r4.yaml writes it.
RECIPE: dict[str, Any] = {
    "model": {"name_or_path": "gpt2-medium"},
    "task": {"name": "e2e", "max_length": 512},
    "lora": {"r": 4, "alpha": 32, "dropout": 0.1, "target_modules": None},
    "train": {"batch_size": 8, "lr": 2e-4, "weight_decay": 0.01, "label_smoothing": 0.1},
}


def training_batches(data_dir: Path, tokenizer_dir: Path, rows: int, batch_size: int, max_length: int):
    """Length-grouped, dynamically padded batches of the first ``rows`` E2E training pairs."""
    from transformers import AutoTokenizer

    from lorakit.data import PaddingCollator, build_train_dataloader, tokenize_causal_lm
    from lorakit.tasks.e2e import E2ETask

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token  # as lorakit.models.load_tokenizer does for GPT-2
    pairs = E2ETask(str(data_dir)).load("train")
    pairs = pairs.select(range(min(rows, len(pairs))))
    tokenized = tokenize_causal_lm(pairs, tokenizer, max_length)
    loader = build_train_dataloader(
        tokenized, PaddingCollator(tokenizer), batch_size, seed=0, group_by_length=True
    )
    return list(loader), len(pairs), tokenized["length"]


def time_shape(name: str, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, Any]:
    """Seconds for one pass over ``batches`` with LoRA on a randomly initialised model of shape ``name``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorakit.models import apply_lora
    from lorakit.recipe import recipe_from_dict
    from lorakit.tasks import get_task
    from lorakit.training.optimization import build_optimizer, task_loss

    recipe = recipe_from_dict({**RECIPE, "model": {"name_or_path": name}}, source="e2e_epoch_time")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SHAPES[name]))
    for param in model.parameters():
        param.requires_grad_(False)
    _, adapted = apply_lora(recipe, model, get_task("e2e", None))
    model.to(device).train()
    optimizer = build_optimizer(model, recipe.train.lr, recipe.train.weight_decay)

    def step(batch: dict[str, torch.Tensor]) -> None:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = task_loss(logits, batch["labels"], "generation", recipe.train.label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])  # untimed warm-up
    _sync(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    _sync(device)
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "parameters": total,
        "trainable": trainable,
        "adapted_modules": len(adapted),
        "steps": len(batches),
        "seconds": seconds,
        "seconds_per_step": seconds / len(batches),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="E2E training pairs to time (default 64)")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--data-dir", type=Path, default=SHARED / "e2e", help="folder with trainset.csv")
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "gpt2")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch_size, max_length = RECIPE["train"]["batch_size"], RECIPE["task"]["max_length"]
    batches, rows, lengths = training_batches(
        args.data_dir, args.tokenizer, args.rows, batch_size, max_length
    )
    padded = sum(int(b["input_ids"].numel()) for b in batches)
    results = []
    for name in args.models:
        timing = time_shape(name, batches, device)
        per_1000 = timing["seconds"] / rows * 1000
        timing.update(
            seconds_per_1000_examples=per_1000,
            examples_per_second=rows / timing["seconds"],
            projected_epoch_hours=per_1000 * E2E_TRAIN_PAIRS / 1000 / 3600,
        )
        results.append(timing)
    report = {
        "setting": "LoRA r=4 alpha=32 on c_attn[q,v], dropout 0.1, label smoothing 0.1, AdamW, batch 8, "
        "max_length 512, dynamic padding, length-grouped batches; random weights",
        "rows": rows,
        "tokens_per_example": sum(lengths) / len(lengths),
        "padding_fraction": 1 - sum(lengths) / padded,
        "e2e_train_pairs": E2E_TRAIN_PAIRS,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        # Other work on the machine slows every figure; the load average says how much there was.
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "results": results,
    }
    print(f"E2E LoRA training speed: {rows} real rows, {report['tokens_per_example']:.1f} tokens/example, "
          f"{report['device']}, {report['threads']} threads")  # fmt: skip
    print("| Model | Steps | s/step | s per 1,000 examples | examples/s | projected epoch (h) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        cells = (
            r["model"],
            str(r["steps"]),
            f"{r['seconds_per_step']:.2f}",
            f"{r['seconds_per_1000_examples']:.0f}",
            f"{r['examples_per_second']:.2f}",
            f"{r['projected_epoch_hours']:.1f}",
        )
        print("| " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
