"""The quality benchmark's report: the learning-rate picks, and quality.json and its curves figure from the
finished points (rendered into RESULTS.md by ``bench_quality_render``).

The targets were fixed before the first run (issue 26; also in configs/sweeps/minilm-quality.yaml):

* A contender's score on a task is the median over its seeds of the dev main metric after the last epoch
  (STS-B Pearson, MRPC accuracy, RTE accuracy, CoLA MCC, SST-2 accuracy; ×100).
* Averaged over the tasks (five): lorakit LoRA ≥ full fine-tuning − 1.0 point, and ≥ PEFT LoRA − 0.5 point.
* Per task: lorakit LoRA's wall time (the median over seeds of its run's data, model, steps, evaluation and
  saving seconds) ≤ 0.8× PEFT + Trainer's (from reading the data to the saved adapter).
* Issue 27, per task (SST-2, STS-B): the median over three seeds of LoRA on an nf4 (and an int8) base within
  1.0 point of LoRA on the float32 base, |difference| ≤ 1.0, in the same sweep.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import bench_quality as bq  # its paths by attribute: a test points them at a tiny model's sweeps

CONTENDERS = {"lorakit": "lorakit LoRA", "full": "lorakit full FT", "peft": "PEFT LoRA + Trainer"}
VS_FULL, VS_PEFT, WALL_RATIO, QUANT_GAP = -1.0, -0.5, 0.8, 1.0


def _lorakit_run(point: Any) -> dict[str, Any] | None:
    """A finished lorakit point as a run record (None while it is not finished)."""
    from lorakit.analysis.sweep import finished_metrics

    m = finished_metrics(bq.ROOT / point.run_dir)
    if m is None:
        return None
    seconds = m.get("seconds", {})
    main = m["main_metric"]
    recipe = point.recipe
    return {
        "contender": "lorakit" if recipe.method == "lora" else "full",
        "task": recipe.task.name,
        "seed": recipe.train.seed,
        "lr": recipe.train.lr,
        "quantize": getattr(recipe.model, "quantize", "none"),
        "main_metric": main,
        "main": m["final"][main],
        "final": {k: v for k, v in m["final"].items() if k != "step"},
        "curve": [h[main] for h in m["history"] if main in h],
        "trainable": m["parameters"]["trainable"],
        "train_rows": m["train_samples"] // recipe.train.epochs,
        "train_seconds": m["train_seconds"],
        "wall_seconds": sum(v for k, v in seconds.items() if k != "start-up"),
        "peak_memory_bytes": m.get("peak_memory_bytes"),
        "point": point.name,
    }


def _peft_run(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def grid_results() -> dict[str, list[dict[str, Any]]]:
    """Every finished grid point: contender -> [{lr, main}] in grid order."""
    grid: dict[str, list[dict[str, Any]]] = {}
    for name, path in bq.LR_SWEEPS.items():
        runs = [_lorakit_run(p) for p in bq.sweep_points(path)]
        grid[name] = [
            {"lr": r["lr"], "main": r["main"], "wall_seconds": r["wall_seconds"]} for r in runs if r
        ]
    peft = [
        _peft_run(bq.PEFT_DIR / "lr-grid" / f"{p.name}.json")
        for p in bq.sweep_points(bq.LR_SWEEPS["lorakit"])
    ]
    grid["peft"] = [{"lr": r["lr"], "main": r["main"], "wall_seconds": r["wall_seconds"]} for r in peft if r]
    return grid


def check_picks() -> dict[str, float]:
    """Each contender's pick (the best held-out score of its grid); exits unless the grid is finished and
    configs/sweeps/minilm-quality*.yaml train at exactly these rates."""
    grid = grid_results()
    sizes = {
        "lorakit": len(bq.sweep_points(bq.LR_SWEEPS["lorakit"])),
        "full": len(bq.sweep_points(bq.LR_SWEEPS["full"])),
    }
    sizes["peft"] = sizes["lorakit"]
    for name, runs in grid.items():
        if len(runs) != sizes[name]:
            raise SystemExit(f"the {name} learning-rate grid is not finished: run --stage grid first")
    picks = {name: max(runs, key=lambda r: r["main"])["lr"] for name, runs in grid.items()}
    for path in bq.MAIN_SWEEPS:
        for point in bq.sweep_points(path):
            want = picks["lorakit" if point.recipe.method == "lora" else "full"]
            if point.recipe.train.lr != want:
                raise SystemExit(
                    f"{path}: {point.name} trains at lr {point.recipe.train.lr:g}; the grid picked {want:g}"
                )
    return picks


def _score(runs: list[dict[str, Any]]) -> float | None:
    return statistics.median(r["main"] for r in runs) if runs else None


def collect() -> dict[str, Any]:
    """quality.json's content from every finished run."""
    import torch
    from bench_common import environment

    main = bq.sweep_points(bq.MAIN_SWEEPS[0])  # resolved once: every recipe of the sweep is validated
    points = main + [p for path in bq.MAIN_SWEEPS[1:] for p in bq.sweep_points(path)]
    lorakit = [r for p in points if (r := _lorakit_run(p))]
    peft = [r for p in main if (r := _peft_run(bq.PEFT_DIR / bq.PEFT_MAIN / f"{p.name}.json"))]
    runs = lorakit + peft
    tasks = []
    for task in dict.fromkeys(p.recipe.task.name for p in main):
        mine = [r for r in runs if r["task"] == task]
        by = {
            c: sorted((r for r in mine if r["contender"] == c), key=lambda r: r["seed"]) for c in CONTENDERS
        }
        # Wall times of the runs at PEFT's seed: lorakit LoRA's run there is trained right before PEFT's
        # (bench_quality.main_stage), so the ratio compares neighbours, on one machine, minutes apart.
        seed = by["peft"][0]["seed"] if by["peft"] else None
        walls = {c: next((r["wall_seconds"] for r in rs if r["seed"] == seed), None) for c, rs in by.items()}
        ratio = walls["lorakit"] / walls["peft"] if walls["lorakit"] and walls["peft"] else None
        tasks.append(
            {
                "task": task,
                "main_metric": mine[0]["main_metric"] if mine else None,
                "score": {c: _score(rs) for c, rs in by.items()},
                "wall_seconds": walls,
                "wall_ratio": ratio,
                "wall_met": None if ratio is None else ratio <= WALL_RATIO,
                "runs": [r for c in CONTENDERS for r in by[c]],
            }
        )
    # Every point of every quality sweep (the other seeds too: they move the medians) and PEFT beside each.
    complete = len(lorakit) == len(points) and len(peft) == sum(p.recipe.method == "lora" for p in main)
    average = {c: statistics.fmean(t["score"][c] for t in tasks) if complete else None for c in CONTENDERS}
    targets = None
    if complete:
        targets = {
            "vs_full": average["lorakit"] - average["full"],
            "vs_full_met": average["lorakit"] - average["full"] >= VS_FULL,
            "vs_peft": average["lorakit"] - average["peft"],
            "vs_peft_met": average["lorakit"] - average["peft"] >= VS_PEFT,
        }
    quant_points = bq.sweep_points(bq.QUANT_SWEEP) if bq.QUANT_SWEEP.is_file() else []
    quant = [r for p in quant_points if (r := _lorakit_run(p))]
    same_lr = same_rate(main, lorakit)
    grid = grid_results()
    # The runs' own wall times (each run's data, model, steps, evaluation and saving), by stage.
    stages = {
        "grid": sum(g["wall_seconds"] for runs in grid.values() for g in runs),
        "quality": sum(r["wall_seconds"] for r in runs) + sum(r["peft_wall_seconds"] for r in same_lr),
        "quant": sum(r["wall_seconds"] for r in quant),
    }
    return {
        "environment": environment(torch.device("cpu")),
        "seconds": sum(stages.values()),
        "seconds_by_stage": stages,
        "complete": complete,
        "epochs": sorted({p.recipe.train.epochs for p in points}),
        "grid": grid,
        "picks": {n: max(rs, key=lambda r: r["main"])["lr"] for n, rs in grid.items() if rs},
        "tasks": tasks,
        "average": average,
        "targets": targets,
        "quant": quant_summary(quant),
        "quant_epochs": sorted({p.recipe.train.epochs for p in quant_points}),
        "same_lr": same_lr,
    }


def same_rate(main: list[Any], lorakit: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """PEFT + Trainer at lorakit LoRA's rate beside lorakit LoRA, seed 0, per task (not a target)."""
    rows = []
    for point in main:
        peft = _peft_run(bq.PEFT_DIR / bq.PEFT_SAME_LR / f"{point.name}.json")
        ours = [r for r in lorakit if r["point"] == point.name and r["contender"] == "lorakit"]
        if peft and ours:
            rows.append(
                {
                    "task": peft["task"],
                    "lr": peft["lr"],
                    "lorakit": ours[0]["main"],
                    "peft": peft["main"],
                    "peft_curve": peft["curve"],
                    "lorakit_wall_seconds": ours[0]["wall_seconds"],
                    "peft_wall_seconds": peft["wall_seconds"],
                }
            )
    return rows


def quant_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 27's rows: per task and quantization, the median over seeds and its gap to float32's."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs):
        base = [r for r in runs if r["task"] == task and r["quantize"] == "none"]
        for kind in dict.fromkeys(r["quantize"] for r in runs if r["quantize"] != "none"):
            mine = [r for r in runs if r["task"] == task and r["quantize"] == kind]
            gap = _score(mine) - _score(base) if mine and base else None
            rows.append(
                {
                    "task": task,
                    "quantize": kind,
                    "seeds": {str(r["seed"]): r["main"] for r in sorted(mine, key=lambda r: r["seed"])},
                    "float32_seeds": {
                        str(r["seed"]): r["main"] for r in sorted(base, key=lambda r: r["seed"])
                    },
                    "median": _score(mine),
                    "float32_median": _score(base),
                    "gap": gap,
                    "met": None if gap is None or len(mine) < 3 or len(base) < 3 else abs(gap) <= QUANT_GAP,
                }
            )
    return rows


def write_report(out: Path) -> Path:
    """Write ``out/quality.json`` and the curves figure ``out/quality.png``; returns the JSON's path."""
    data = collect()
    data["environment"]["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quality.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    plot_curves(data, out / "quality.png")
    return path


def plot_curves(data: dict[str, Any], path: Path) -> None:
    """Dev main metric after each epoch, seed 0, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(data["tasks"])
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.0), squeeze=False)
    axes = axes[0]
    for ax, task in zip(axes, data["tasks"], strict=True):
        for contender, label in CONTENDERS.items():
            seed0 = [r for r in task["runs"] if r["contender"] == contender and r["seed"] == 0]
            if seed0:
                curve = seed0[0]["curve"]
                ax.plot(range(1, len(curve) + 1), curve, marker="o", label=label)
        ax.set_title(f"{task['task']} ({task['main_metric']})")
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
