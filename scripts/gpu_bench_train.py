"""Training throughput and peak memory of LoRA against full fine-tuning, on a roberta-base-shaped model.

Random weights (no download): the shapes, not the values, decide speed and memory. Each method trains
a few steps of bf16 mixed precision (float32 weights, bf16 autocast, as ``train.mixed_precision: bf16``
does) with lorakit's own LoRA injection, loss and optimizer groups, and runs in a fresh process so its
peak memory is its own: CUDA max allocated, or the process's max resident set on the CPU.

    python scripts/gpu_bench_train.py                          # CUDA: 20 timed steps, batch 32 x 128 tokens
    python scripts/gpu_bench_train.py --device cpu --steps 3   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

import torch

METHODS = ("lora", "full")


def _model(method: str, device: str) -> torch.nn.Module:
    from lorakit.models import apply_lora
    from lorakit.paper_models import paper_model
    from lorakit.recipe import recipe_from_dict
    from lorakit.tasks import get_task

    torch.manual_seed(0)
    model = paper_model("roberta-base", num_labels=3).to(device)  # three labels, as for MNLI
    if method == "lora":  # the paper's RoBERTa-base setting: r = 8 on query and value, the head trains
        apply_lora(
            recipe_from_dict({"task": {"name": "mnli"}, "lora": {"r": 8, "alpha": 16}}),
            model,
            get_task("mnli"),
        )
    else:
        model.requires_grad_(True)
    return model.train()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_method(
    method: str, device: str, steps: int, batch: int, seq_len: int, precision: str
) -> dict[str, Any]:
    """Train ``steps`` timed steps (after untimed warm-up ones) and measure samples/s and peak memory."""
    from lorakit.lora import count_parameters
    from lorakit.training.optimization import build_optimizer, float32_trainables, task_loss

    model = _model(method, device)
    float32_trainables(model)
    optimizer = build_optimizer(model, 1e-4, 0.01)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50265, (batch, seq_len), generator=gen).to(device)
    labels = torch.randint(0, 3, (batch,), generator=gen).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup = 2 if device == "cuda" else 1  # CUDA's first steps pay for kernel selection and allocation
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=ids).logits
        loss = task_loss(logits, labels, "classification", 0.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    elapsed = time.perf_counter() - start
    if device == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"
    counts = count_parameters(model)
    return {
        "method": method,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "precision": precision,
        "batch": batch,
        "seq_len": seq_len,
        "steps": steps,
        "trainable_parameters": counts.trainable,
        "total_parameters": counts.total,
        "samples_per_second": steps * batch / elapsed,
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": kind,
        "final_loss": float(loss),
    }


def _in_fresh_process(method: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--method", method, "--child", "--device", args.device]
    cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    cmd += ["--precision", args.precision]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse arguments, run each method in its own process, print a table (and JSON with --out)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CUDA, 2 on the CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 128 on CUDA, 32 on the CPU")
    parser.add_argument("--precision", choices=("bf16", "no"), default="bf16")
    parser.add_argument("--method", choices=(*METHODS, "both"), default="both")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu")
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (32 if cuda else 2)
    args.seq_len = args.seq_len or (128 if cuda else 32)
    if args.child:
        result = run_method(
            args.method, args.device, args.steps, args.batch_size, args.seq_len, args.precision
        )
        print(json.dumps(result))
        return
    methods = METHODS if args.method == "both" else (args.method,)
    results = [_in_fresh_process(m, args) for m in methods]
    first = results[0]
    print(
        f"{first['device']}  {args.precision}  batch {args.batch_size} x {args.seq_len} tokens  "
        f"{args.steps} timed steps  ({first['peak_memory_kind']})"
    )
    print(f"{'method':<6} {'trainable':>12} {'samples/s':>10} {'peak MiB':>10}")
    for r in results:
        mib = r["peak_memory_bytes"] / 2**20
        print(
            f"{r['method']:<6} {r['trainable_parameters']:>12,} {r['samples_per_second']:>10.1f} {mib:>10.0f}"
        )
    if len(results) == 2:
        lora, full = results
        print(
            f"LoRA/full: {lora['samples_per_second'] / full['samples_per_second']:.2f}x samples/s, "
            f"{lora['peak_memory_bytes'] / full['peak_memory_bytes']:.2f}x peak memory"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
