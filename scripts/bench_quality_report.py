"""The quality benchmark's report: the learning-rate picks, quality.json from the finished points, and its
RESULTS.md section and targets (rendered by ``bench_report``).

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
from bench_format import table

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


def _others(run: dict[str, Any]) -> str:
    """The task's other dev metrics after the last epoch (STS-B's Spearman, MRPC's F1)."""
    return ", ".join(f"{k} {v:.2f}" for k, v in run["final"].items() if k != run["main_metric"]) or "—"


def _curve(values: list[float]) -> str:
    return " → ".join(f"{v:.1f}" for v in values)


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def targets(data: dict[str, Any] | None) -> list[tuple[str, str, bool]]:
    """The quality rows of RESULTS.md's Targets table (only targets whose runs have all finished)."""
    if not data:
        return []
    rows = []
    t = data["targets"]
    if t:
        rows.append(
            (
                "quality: 5-task average, lorakit LoRA ≥ full FT − 1.0",
                f"{t['vs_full']:+.2f}",
                t["vs_full_met"],
            )
        )
        rows.append(
            ("quality: 5-task average, lorakit LoRA ≥ PEFT − 0.5", f"{t['vs_peft']:+.2f}", t["vs_peft_met"])
        )
    for task in data["tasks"]:
        if task["wall_met"] is not None:
            rows.append(
                (
                    f"quality: {task['task']} wall time ≤ 0.8× PEFT + Trainer",
                    f"{task['wall_ratio']:.3f}",
                    task["wall_met"],
                )
            )
    for q in data["quant"]:
        if q["met"] is not None:
            rows.append(
                (
                    f"quant quality: {q['task']} {q['quantize']} within 1.0 of float32",
                    f"{q['gap']:+.2f}",
                    q["met"],
                )
            )
    return rows


def render(data: dict[str, Any] | None) -> list[str]:
    """RESULTS.md's quality section."""
    if not data:
        return []
    from bench_format import header

    lines = header("Quality at real budgets: MiniLM-L6 on GLUE (issue 26)", data)
    took = ", ".join(f"{k} {v / 60:.0f} min" for k, v in data["seconds_by_stage"].items() if v)
    lines += [
        "The real pretrained MiniLM-L6, full dev sets, batch 32, "
        f"{'/'.join(map(str, data.get('epochs') or [3]))} epochs (max_length 128, linear "
        "decay after 6% warmup, weight decay 0.01, clipping 1.0); LoRA r = 8, alpha = 16 on query and "
        "value, BERT's pooler and classifier trained as the head (PEFT: the same, `modules_to_save`). "
        "Training rows: STS-B, MRPC, RTE and CoLA whole, SST-2 8,000 drawn with the seed. Score: the dev "
        "main metric after the last epoch, the "
        f"median over seeds where a task has three. Runs' wall time by stage: {took}.",
        "",
        "Targets, fixed before the first run: averaged over the five tasks, lorakit LoRA ≥ full "
        "fine-tuning − 1.0 and ≥ PEFT LoRA − 0.5; per task, lorakit LoRA's wall time (data, model, "
        "steps, evaluations, saving) "
        "≤ 0.8× PEFT + Trainer's (reading the data to the saved adapter), each at seed 0, lorakit's run "
        "trained right before PEFT's.",
        "",
    ]
    if not data["complete"]:
        lines += [
            "**Not finished**: the rows below are the runs done so far (`make bench-quality` resumes).",
            "",
        ]
    rows = []
    for task in data["tasks"]:
        s, w = task["score"], task["wall_seconds"]
        gap_full = None if s["lorakit"] is None or s["full"] is None else s["lorakit"] - s["full"]
        gap_peft = None if s["lorakit"] is None or s["peft"] is None else s["lorakit"] - s["peft"]
        rows.append(
            [task["task"], task["main_metric"] or "—"]
            + [_fmt(s[c]) for c in CONTENDERS]
            + [_fmt(gap_full, "+.1f"), _fmt(gap_peft, "+.1f")]
            + [_fmt(w["lorakit"], ".0f"), _fmt(w["peft"], ".0f"), _fmt(task["wall_ratio"], ".3f")]
        )
    avg = data["average"]
    if data["complete"]:
        rows.append(["**average**", ""] + [f"**{avg[c]:.2f}**" for c in CONTENDERS] + ["", "", "", "", ""])
    head = [
        "task",
        "metric",
        *CONTENDERS.values(),
        "LoRA − full",
        "LoRA − PEFT",
        "LoRA s",
        "PEFT s",
        "wall ratio",
    ]
    lines += table(head, rows)
    lines += ["Per run (final dev score; curve = dev score after each epoch):", ""]
    per_run = [
        [t["task"], CONTENDERS[r["contender"]], r["seed"], f"{r['lr']:g}", f"{r['main']:.2f}", _others(r)]
        + [_curve(r["curve"]), f"{r['trainable']:,}", f"{r['wall_seconds']:.0f}"]
        for t in data["tasks"]
        for r in t["runs"]
    ]
    head = ["task", "contender", "seed", "lr", "final", "other metrics", "curve", "trainable", "wall s"]
    lines += table(head, per_run)
    grid = data["grid"]
    lrs = sorted({g["lr"] for runs in grid.values() for g in runs})
    grid_rows = [
        [CONTENDERS[c]]
        + [
            next(
                (
                    f"{g['main']:.2f}" + (" ←" if g["lr"] == data["picks"].get(c) else "")
                    for g in runs
                    if g["lr"] == lr
                ),
                "",
            )
            for lr in lrs
        ]
        for c, runs in grid.items()
    ]
    lines += [
        "Learning rates: each contender's grid, scored by Pearson on 1,000 of STS-B's training rows held out "
        "(seed 12345) after 2 epochs on 2,000 others; ← marks the pick, used for every task.",
        "",
    ]
    lines += table(["contender", *(f"{lr:g}" for lr in lrs)], grid_rows)
    if data["same_lr"]:
        lines += [
            "Beside the protocol (not a target): PEFT + Trainer at lorakit LoRA's rate, seed 0, so that "
            "the two LoRA implementations meet at one setting.",
            "",
        ]
        lines += table(
            [
                "task",
                "lr",
                "lorakit LoRA",
                "PEFT LoRA + Trainer",
                "curve (PEFT)",
                "LoRA − PEFT",
                "wall ratio",
            ],
            [
                [r["task"], f"{r['lr']:g}", f"{r['lorakit']:.2f}", f"{r['peft']:.2f}"]
                + [_curve(r["peft_curve"]), f"{r['lorakit'] - r['peft']:+.2f}"]
                + [f"{r['lorakit_wall_seconds'] / r['peft_wall_seconds']:.3f}"]
                for r in data["same_lr"]
            ],
        )
    if any(q["median"] is not None for q in data["quant"]):
        epochs = "/".join(map(str, data.get("quant_epochs") or [3]))
        lines += [
            "### LoRA on a quantized base (issue 27)",
            "",
            "`configs/sweeps/minilm-quality-quant.yaml`: lorakit LoRA at its pick on a float32, nf4 and "
            f"int8 base, {epochs} epochs, seeds 0–2, the recipe above otherwise. Rule, fixed before the "
            "first run: per task, the median over the seeds within 1.0 point of float32's.",
            "",
        ]
        lines += table(
            ["task", "base", "per seed", "median", "float32 per seed", "float32 median", "difference", "met"],
            [
                [
                    q["task"],
                    q["quantize"],
                    ", ".join(f"{v:.2f}" for v in q["seeds"].values()),
                    _fmt(q["median"], ".2f"),
                ]
                + [
                    ", ".join(f"{v:.2f}" for v in q["float32_seeds"].values()),
                    _fmt(q["float32_median"], ".2f"),
                ]
                + [_fmt(q["gap"], "+.2f"), "—" if q["met"] is None else ("yes" if q["met"] else "**no**")]
                for q in data["quant"]
            ],
        )
    return lines + ["![quality curves](quality.png)", ""]
