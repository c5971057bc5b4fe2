"""RESULTS.md's quality sections: the real-task comparison, the learning-rate sweep, and the LoRA setups."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bench_format import NAMES, count, header, plot_bars


def quality_section(data: dict[str, Any], out: Path) -> list[str]:
    """The real-task table (lorakit LoRA, full fine-tuning, PEFT LoRA) and its plot."""
    r = data["result"]
    lines = header(f"Quality: {r['model']} on real GLUE data", data)
    lines += [
        "| task | train rows × epochs | dev rows | metric | majority class | lorakit LoRA | "
        "full fine-tuning | PEFT LoRA | LoRA − full | lr (LoRA / full) | "
        "train time (lorakit / full / PEFT) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    groups, series = [], {NAMES[n]: [] for n in ("lorakit", "full", "peft")}
    for t in r["tasks"]:
        c = t["contenders"]
        groups.append(t["task"])
        for n in ("lorakit", "full", "peft"):
            series[NAMES[n]].append(c[n]["main"])
        gap = c["lorakit"]["main"] - c["full"]["main"]
        times = " / ".join(f"{c[n]['train_seconds']:.0f} s" for n in ("lorakit", "full", "peft"))
        scores = " | ".join(f"{c[n]['main']:.1f}" for n in ("lorakit", "full", "peft"))
        base = t.get("majority_baseline")
        majority = "—" if base is None else f"{base:.1f}"
        lrs = f"{c['lorakit']['lr']:g} / {c['full']['lr']:g}"
        lines.append(
            f"| {t['task']} | {t['train_rows']} × {t['hyper']['epochs']} | {t['eval_rows']} | "
            f"{t['main_metric']} | {majority} | {scores} | {gap:+.1f} | {lrs} | {times} |"
        )
    hp = r["tasks"][0]["hyper"] if r["tasks"] else {}
    first = r["tasks"][0]["contenders"] if r["tasks"] else {}
    lines += [
        "",
        f"Learning rates: each method's own for each task ({data['result'].get('lr_source', '')}); "
        "PEFT LoRA trains at lorakit LoRA's. Everything else identical: "
        f"batch {hp.get('batch_size')}, "
        f"max length {hp.get('max_length')}, linear schedule with {hp.get('warmup_ratio')} warm-up, "
        f"weight decay {hp.get('weight_decay')}, gradient clipping {hp.get('max_grad_norm')}, "
        f"seed {hp.get('seed')}; "
        "LoRA r = 8, alpha = 16 on query and value, with BERT's pooler and classifier trained (lorakit's "
        "default head for BERT: together they are what RoBERTa calls `classifier`), for lorakit and PEFT "
        "alike. Trainable parameters: "
        + ", ".join(f"{NAMES[n]} {count(c['trainable'])}" for n, c in first.items())
        + ". Majority class: the accuracy of always giving the dev set's most common answer; a score near "
        "it means the model has learnt little yet. Train time is wall-clock on a shared machine.",
        "",
    ]
    plot_bars(out / "quality.png", "Dev score (main metric)", groups, series, "score")
    lines += ["![quality](quality.png)", ""]
    return lines


def sweep_section(data: dict[str, Any]) -> list[str]:
    """Every learning rate the sweep tried, per task and method, with the picks marked."""
    r = data["result"]
    lines = header("Learning-rate sweep: each task, scored on held-out training rows", data)
    lines += [
        "| task | train rows × epochs | held-out rows | metric | method | lr | held-out score | train time |",
        "|---|---|---:|---|---|---:|---:|---:|",
    ]
    for t in r["tasks"]:
        for run in sorted(t["runs"], key=lambda x: (x["method"], x["lr"])):
            pick = " (picked)" if t["picks"][run["method"]] == run["lr"] else ""
            lines.append(
                f"| {t['task']} | {t['train_rows']} × {t['epochs']} | {t['heldout_rows']} | "
                f"{t['main_metric']} | {run['method']} | {run['lr']:g}{pick} | {run['main']:.1f} | "
                f"{run['train_seconds']:.0f} s |"
            )
    lines += [
        "",
        "Each task's training rows are drawn from what is left of its training file once the held-out "
        "rows are set aside; the dev set was not used for tuning. Each "
        "method's best held-out score is its pick for the quality table above.",
        "",
    ]
    return lines


def variants_section(data: dict[str, Any]) -> list[str]:
    """The LoRA setups tried on one task, with full fine-tuning for reference."""
    r = data["result"]
    lines = header(f"LoRA setups on {r['task']}, scored on {r['heldout_rows']} held-out training rows", data)
    base = r.get("majority_baseline")
    lines += [
        "| setup | train rows × epochs | lr | trainable params | held-out score | train time |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for run in r["runs"]:
        lines.append(
            f"| {run['setup']} | {run['train_rows']} × {r['epochs']} | {run['lr']:g} | "
            f"{count(run['trainable'])} | {run['main']:.1f} | {run['train_seconds']:.0f} s |"
        )
    lines += [
        "",
        f"Main metric: {r['main_metric']}"
        + ("" if base is None else f"; always answering the most common class scores {base:.1f}")
        + f". Learning rates: {r.get('lr_source', '')}. Every LoRA setup is r = 8, alpha = 16, lorakit's "
        "layers; the held-out rows are set aside before the training rows are drawn, as in the sweep.",
        "",
    ]
    return lines


def seed_scores(quality: dict[str, Any], seeds: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per task: the seeds run (0 is the quality section's own), each method's dev scores by seed, the
    medians over seeds (the paper's convention: its GLUE figures are medians over 5 seeds), their gap,
    and the mean of the per-seed gaps with its standard error."""
    extra = {t["task"]: t["runs"] for t in (seeds or {}).get("result", {}).get("tasks", [])}
    out = {}
    for t in quality["result"]["tasks"]:
        c = t["contenders"]
        runs = [{"seed": t["hyper"]["seed"], "lorakit": c["lorakit"]["main"], "full": c["full"]["main"]}]
        runs += extra.get(t["task"], [])
        lora = [run["lorakit"] for run in runs]
        full = [run["full"] for run in runs]
        gaps = [a - b for a, b in zip(lora, full, strict=True)]
        se = statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else None
        out[t["task"]] = {
            "metric": t["main_metric"],
            "seeds": [run["seed"] for run in runs],
            "lorakit": lora,
            "full": full,
            "median_gap": statistics.median(lora) - statistics.median(full),
            "mean_gap": statistics.fmean(gaps),
            "mean_gap_se": se,
        }
    return out


def seeds_section(data: dict[str, Any], quality: dict[str, Any]) -> list[str]:
    """Dev scores of lorakit LoRA and full fine-tuning over seeds, with the quality section's seed 0."""
    lines = header("Quality over seeds: lorakit LoRA against full fine-tuning on the dev sets", data)
    lines += [
        "| task | metric | seeds | lorakit LoRA by seed | full fine-tuning by seed | median LoRA − median "
        "full | mean per-seed gap ± s.e. |",
        "|---|---|---|---|---|---:|---:|",
    ]
    for task, s in seed_scores(quality, data).items():
        se = "" if s["mean_gap_se"] is None else f" ± {s['mean_gap_se']:.1f}"
        lines.append(
            f"| {task} | {s['metric']} | {', '.join(map(str, s['seeds']))} | "
            f"{' / '.join(f'{v:.1f}' for v in s['lorakit'])} | {' / '.join(f'{v:.1f}' for v in s['full'])} | "
            f"**{s['median_gap']:+.1f}** | {s['mean_gap']:+.1f}{se} |"
        )
    lines += [
        "",
        "Seed 0 is the quality table's run; every other seed draws another training subset and seeds the "
        "head's init, the batch order and dropout anew, with everything else as there (the same dev "
        "rows, each method at the task's swept learning rate). One seed's dev score moves by a few "
        "points on these small subsets, more than the 2-point margin the targets check, so the targets "
        "take the median over seeds, as the LoRA paper reports its GLUE figures (median of 5 seeds). "
        "PEFT is not rerun: at seed 0 it scores exactly what lorakit does.",
        "",
    ]
    return lines
