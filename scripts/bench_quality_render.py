"""The quality benchmark's RESULTS.md section and its rows of the Targets table, rendered from quality.json
(``bench_quality_report.collect``); read by ``bench_report``."""

from __future__ import annotations

from typing import Any

from bench_format import header, table
from bench_quality_report import CONTENDERS

LEVEL = 1.0  # a curve "has levelled off" when its last epoch gained at most this many points


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
    rows += [
        (f"quality: {k['task']} wall time ≤ 0.8× PEFT + Trainer", f"{k['wall_ratio']:.3f}", k["wall_met"])
        for k in data["tasks"]
        if k["wall_met"] is not None
    ]
    rows += [
        (f"quant quality: {q['task']} {q['quantize']} within 1.0 of float32", f"{q['gap']:+.2f}", q["met"])
        for q in data["quant"]
        if q["met"] is not None
    ]
    return rows


def levelling(data: dict[str, Any]) -> str:
    """One sentence on whether the seed-0 curves had levelled off by the last epoch (the issue caps epochs
    at 5, so a curve still rising there is reported, not trained further)."""
    rising = []
    runs = [
        (t["task"], r) for t in data["tasks"] for r in t["runs"] if r["seed"] == 0 and len(r["curve"]) > 1
    ]
    for task, r in runs:
        change = r["curve"][-1] - r["curve"][-2]
        if change > LEVEL:
            rising.append(f"{task} {CONTENDERS[r['contender']]} ({change:+.1f})")
    return (
        f"Levelling off (seed 0): in the last epoch, {len(runs) - len(rising)} of {len(runs)} curves "
        f"gained at most {LEVEL:g} point"
        + (f"; still rising by more at the epoch cap: {', '.join(rising)}." if rising else ".")
    )


def render(data: dict[str, Any] | None) -> list[str]:
    """RESULTS.md's quality section."""
    if not data:
        return []
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
    lines += [
        "Per run (final dev score; curve = dev score after each epoch). Only the seed-0 pairs, trained back "
        "to back, compare wall times; the other runs may have shared the CPU with other work.",
        "",
    ]
    per_run = [
        [t["task"], CONTENDERS[r["contender"]], r["seed"], f"{r['lr']:g}", f"{r['main']:.2f}", _others(r)]
        + [_curve(r["curve"]), f"{r['trainable']:,}", f"{r['wall_seconds']:.0f}"]
        for t in data["tasks"]
        for r in t["runs"]
    ]
    head = ["task", "contender", "seed", "lr", "final", "other metrics", "curve", "trainable", "wall s"]
    lines += table(head, per_run)
    lines += [levelling(data), ""]
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
            ],
            [
                [r["task"], f"{r['lr']:g}", f"{r['lorakit']:.2f}", f"{r['peft']:.2f}"]
                + [_curve(r["peft_curve"]), f"{r['lorakit'] - r['peft']:+.2f}"]
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
