"""lorakit's benchmarks: LoRA's promises measured against what a user would pick instead, in one run.

    python scripts/bench.py --out benchmarks            # make bench (55 min on 2 cores; then 10 more, below)
    python scripts/bench.py --quick --out benchmarks    # make bench-quick  (a few minutes)
    python scripts/bench.py --only speed --out DIR      # one section (repeatable; see SECTIONS)

Sections write ``DIR/<section>.json`` (``--quick`` runs write ``DIR/quick/``); ``DIR/RESULTS.md`` and its
PNG plots are then rendered from every section JSON in DIR, so rerunning one section keeps the others.
`make bench` then runs scripts/bench_overload.py and scripts/bench_generation_serve.py (their own `lorakit
serve` processes, about 10 minutes), which write their JSON beside these and render RESULTS.md again.
Quality at real training budgets is its own long, resumable run: scripts/bench_quality.py (`make
bench-quality`), whose quality.json RESULTS.md renders too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = (
    "sizes",
    "speed",
    "speed-bf16",
    "speed-llama",
    "inference",
    "inference-bf16",
    "adapters",
    "quant",
    "serve",
    "whole-run",
)


def _plan(quick: bool) -> dict:
    """How big each section runs: full (``make bench``) or quick (``make bench-quick``)."""
    if quick:
        return {
            "speed": [("roberta-small", 8, 64, 2), ("gpt2-small4", 4, 64, 2)],
            "speed_llama": [("llama-small4", 4, 64, 2)],
            "layers": [("roberta-small", 8, 64, 20), ("gpt2-small4", 4, 64, 20)],
            "inference": ("roberta-small", (1, 32), 128, (5, 2)),
            "inference_layers": [("roberta-small", rows, 64, 10, 8, False) for rows in (1, 32)],
            "adapters": ("roberta-small", 16, 16, (1, 4, 16), 2),
            "quant": (("gpt2-small4", 4, 64, 2), ("roberta-small", 16, 16, 2)),
            # serve: training rows, dev rows a task, clients, requests, rows a request, rounds, time limit (s)
            "serve": (32, 16, 8, 40, 4, 2, 60.0),
            "whole_run": (1, ("fp32",)),
        }
    import torch

    # GPT-2 medium (and the ~350M Llama) at 16 × 128 would put a section over its time budget on 2 CPU
    # cores: 4 × 128 there, 16 × 128 on a GPU.
    gpt2_rows = 16 if torch.cuda.is_available() else 4
    return {
        # Rounds of the LoRA contenders, then how many of them also run a full fine-tuning step.
        "speed": [("roberta-base", 16, 128, 3, 2), ("gpt2-medium", gpt2_rows, 128, 3, 2)],
        # The Llama shape alone in its section: 8 rounds of the LoRA contenders, full fine-tuning in 6
        # (one whole cycle of the three-way orders), about 4 minutes on 2 CPU cores.
        "speed_llama": [("llama-350m", gpt2_rows, 128, 8, 6)],
        "layers": [("roberta-base", 16, 128, 20), ("gpt2-medium", gpt2_rows, 128, 20)],
        "inference": ("roberta-base", (1, 32), 128, (10, 3)),
        # gpt2-medium's c_attn at 32 × 128 runs a third of a second per unit, and its gap is wide.
        "inference_layers": [
            (model, rows, 128, 10 if (model, rows) == ("gpt2-medium", 32) else 30, 8, False)
            for model in ("roberta-base", "gpt2-medium")
            for rows in (1, 32)
        ],
        # 64 rows of 32 tokens (SST-2 sentences are about 25): 1, 4 and 16 adapters in one batch.
        "adapters": ("roberta-base", 64, 32, (1, 4, 16), 5),
        # The quantized base (issue 27): training at gpt2-medium 4 × 128, 16 adapters on roberta-base.
        "quant": (("gpt2-medium", 4, 128, 5), ("roberta-base", 64, 32, 10)),
        # 16 clients × 4 rows: up to 64 rows waiting, one full batch at the default --max-batch-size.
        "serve": (300, 64, 16, 300, 4, 5, 120.0),
        # Rounds of both whole processes, and the precisions (about 75 s a round on 2 cores).
        "whole_run": (3, ("fp32", "bf16")),
    }


def run_section(name: str, quick: bool, out: Path, data_root: Path) -> dict:
    """Run one section and return what goes into its JSON."""
    import bench_adapters
    import bench_serve
    import bench_sizes
    import bench_speed

    plan = _plan(quick)
    if name == "sizes":
        return bench_sizes.adapter_size_section(quick)
    if name == "speed":
        return {
            "models": [bench_speed.train_step_benchmark(*spec) for spec in plan["speed"]],
            "layers": [bench_speed.layer_benchmark(*spec) for spec in plan["layers"]],
        }
    if name == "speed-bf16":
        steps = [bench_speed.train_step_benchmark(*spec, precision="bf16") for spec in plan["speed"]]
        return {"models": steps}
    if name == "speed-llama":
        import os

        from bench_common import SHAPES

        steps = [bench_speed.train_step_benchmark(*spec) for spec in plan["speed_llama"]]
        shapes = {m["model"]: SHAPES[m["model"]] for m in steps}
        return {
            "models": steps,
            "shapes": {
                k: {
                    "family": v.family,
                    "config": dict(v.config),
                    "lorakit_targets": v.lorakit_targets,
                    "peft_targets": v.peft_targets,
                }
                for k, v in shapes.items()
            },
            "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }
    if name == "inference":
        return {
            **bench_speed.inference_benchmark(*plan["inference"]),
            "layers": [bench_speed.layer_benchmark(*spec) for spec in plan["inference_layers"]],
        }
    if name == "inference-bf16":
        return bench_speed.inference_benchmark(*plan["inference"], precision="bf16")
    if name == "adapters":
        return bench_adapters.adapters_section(*plan["adapters"])
    if name == "serve":
        return bench_serve.serve_section(*plan["serve"])
    if name == "quant":
        import bench_quant

        return bench_quant.quant_section(*plan["quant"])
    if name == "whole-run":
        import bench_whole_run

        return bench_whole_run.whole_run_section(data_root, *plan["whole_run"])
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lorakit benchmarks against PEFT and full fine-tuning")
    parser.add_argument("--quick", action="store_true", help="small models and subsets (a few minutes)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks", help="results directory")
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="run only this section (repeatable)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO.parent / "shared" / "data" / "glue",
        help="GLUE folders (SST-2, MRPC, STS-B)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the budget: 2 CPU cores)")
    args = parser.parse_args(argv)

    import bench_common
    import bench_report
    from bench_common import environment, setup_torch

    from lorakit.runs import write_json

    out = args.out / "quick" if args.quick else args.out
    bench_common.THREADS = args.threads
    device = setup_torch()
    for name in args.only or SECTIONS:
        print(f"[bench] {name}{' (quick)' if args.quick else ''} ...", flush=True)
        env = environment(device)  # before the run: its date and load average are the start's
        start = time.perf_counter()
        result = run_section(name, args.quick, out, args.data)
        seconds = time.perf_counter() - start
        payload = {
            "section": name,
            "quick": args.quick,
            "seconds": seconds,
            "environment": env,
            "result": result,
        }
        write_json(out / f"{name}.json", payload)
        print(f"[bench] {name}: {seconds:.0f} s", flush=True)
    path = bench_report.render(out)
    print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
