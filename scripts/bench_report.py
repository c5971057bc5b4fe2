"""RESULTS.md and its plots, rendered from the section JSON files a benchmark run leaves in a directory.

Every number in the page is read from those files; nothing here measures anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench_common import read_json

NAMES = {
    "lorakit": "lorakit LoRA",
    "peft": "PEFT LoRA",
    "full": "full fine-tuning",
    "full_fused": "full fine-tuning, fused AdamW",
}
# One colour per contender in every plot.
COLORS = {
    "lorakit LoRA": "tab:blue",
    "PEFT LoRA": "tab:orange",
    "full fine-tuning": "tab:green",
    "full fine-tuning, fused AdamW": "tab:red",
    "base model": "tab:gray",
    "lorakit unmerged": "tab:blue",
    "lorakit merged": "tab:cyan",
    "PEFT unmerged": "tab:orange",
}
INFER_NAMES = {
    "base": "base model",
    "lorakit_unmerged": "lorakit unmerged",
    "lorakit_merged": "lorakit merged",
    "peft_unmerged": "PEFT unmerged",
}


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _both(x: dict[str, Any], y: dict[str, Any]) -> str:
    """Wall-clock ratio of medians, and the CPU-time ratio in brackets."""
    return f"{x['median_s'] / y['median_s']:.2f} ({x['cpu_median_s'] / y['cpu_median_s']:.2f})"


def _ms(s: float) -> str:
    return f"{s * 1e3:,.0f} ms" if s >= 1 else f"{s * 1e3:,.1f} ms"


def _header(name: str, data: dict[str, Any]) -> list[str]:
    env = data["environment"]
    load = env.get("load_average")
    load_txt = f", load average {load[0]:.1f} at start" if load else ""
    return [
        f"## {name}",
        "",
        f"_{env['date']}, {env['device']}, {env['torch_threads']} threads, torch "
        f"{env['torch']}, transformers {env['transformers']}, peft {env['peft']}{load_txt}; section took "
        f"{data['seconds']:.0f} s._",
        "",
    ]


def _plot_bars(
    path: Path, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=label, color=COLORS.get(label))
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars reach the top
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speed(data: dict[str, Any], out: Path) -> list[str]:
    lines = _header("Training step: forward, backward, AdamW step", data)
    lines += [
        "| model | batch × seq | contender | trainable params | median step (min) | CPU time | peak memory | "
        "vs PEFT | vs full | vs full, fused AdamW | memory vs full |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    models = data["result"]["models"]
    names = list(models[0]["contenders"]) if models else []
    groups, times, mems = [], {n: [] for n in names}, {n: [] for n in names}
    for m in models:
        groups.append(m["model"])
        c = m["contenders"]
        for name, x in c.items():
            vs = " | ".join(_both(x, c[other]) for other in ("peft", "full", "full_fused"))
            lines.append(
                f"| {m['model']} | {m['batch']} × {m['seq']} | {NAMES[name]} | {_count(x['trainable'])} | "
                f"{x['median_s']:.2f} s ({x['min_s']:.2f}) | {x['cpu_median_s']:.2f} s | "
                f"{_mb(x['peak_memory_bytes'])} | {vs} | "
                f"{x['peak_memory_bytes'] / c['full']['peak_memory_bytes']:.2f} |"
            )
            times[name].append(x["median_s"])
            mems[name].append(x["peak_memory_bytes"] / 2**30)
    kind = models[0]["memory_kind"] if models else ""
    reps = models[0]["contenders"]["full"]["reps"] if models else 0
    lines += [
        "",
        f"Median (and minimum) wall-clock time of {reps} interleaved steps after one small untimed warm-up "
        "step, each contender in its own process. Ratios: wall-clock medians, then (in brackets) medians of "
        "the process's CPU time, which does not run while other programs hold the cores and so is the "
        "steadier figure on a shared machine. All contenders use lorakit's "
        '`build_optimizer` (AdamW) except "fused AdamW": the same parameter groups with '
        "`torch.optim.AdamW(fused=True)`, the Hugging Face Trainer's default optimizer, so the stronger "
        "full fine-tuning baseline. GPT-2: lorakit adapts the q and v slices of `c_attn` (rank r each); "
        "PEFT adapts `c_attn` whole with the same r, which has exactly the same parameter count "
        "(r · (1024 + 3072) = 2 · r · (1024 + 1024)). Peak memory: "
        + (
            "`torch.cuda.max_memory_allocated`."
            if kind != "peak_rss"
            else "the worker process's peak resident set size (VmHWM), which includes about 0.5 GiB of "
            "Python, torch and transformers, and the model's construction."
        ),
        "",
    ]
    _plot_bars(
        out / "train_step.png",
        "Training step time (median)",
        groups,
        {NAMES[n]: v for n, v in times.items()},
        "seconds",
    )
    _plot_bars(
        out / "train_memory.png",
        "Peak training memory",
        groups,
        {NAMES[n]: v for n, v in mems.items()},
        "GiB",
    )
    ab = data["result"].get("same_process")
    if ab:
        c = ab["contenders"]
        lines += [
            f"Same-process check ({ab['model']}, {ab['batch']} × {ab['seq']}, {c['lorakit']['reps']} steps "
            "each, alternating, both models in one process so that neither has its own memory layout): "
            f"lorakit {c['lorakit']['median_s']:.2f} s, PEFT {c['peft']['median_s']:.2f} s, ratio "
            f"{ab['time_lorakit_over_peft']:.3f} (CPU time {ab['cpu_lorakit_over_peft']:.3f}).",
            "",
        ]
    lines += ["![training step time](train_step.png) ![peak training memory](train_memory.png)", ""]
    return lines


def _inference(data: dict[str, Any], out: Path) -> list[str]:
    r = data["result"]
    lines = _header(f"Inference latency: {r['model']}, seq {r['seq']}, r = {r['r']}", data)
    lines += ["| batch | " + " | ".join(INFER_NAMES.values()) + " |", "|---|" + "---:|" * len(INFER_NAMES)]
    series: dict[str, list[float]] = {v: [] for v in INFER_NAMES.values()}
    for rows, stats in r["batches"].items():
        cells = []
        for key, label in INFER_NAMES.items():
            s = stats[key]
            cells.append(f"{_ms(s['median_s'])}: {s['ratio_to_base']:.3f}× ({s['cpu_ratio_to_base']:.3f}×)")
            series[label].append(s["ratio_to_base"])
        reps = stats["base"]["reps"]
        lines.append(f"| {rows} ({reps} reps) | " + " | ".join(cells) + " |")
    diffs = r["max_abs_diff_vs_lorakit_unmerged"]
    lines += [
        "",
        "Median latency: wall-clock ratio to the base model (CPU-time ratio). Eval mode, "
        "`torch.inference_mode`, interleaved, after one untimed pass each. "
        "The adapter is non-zero; max |Δ logits| against lorakit unmerged: "
        + ", ".join(f"{INFER_NAMES[k]} {v:.1e}" for k, v in diffs.items() if k != "lorakit_unmerged")
        + " (the base model differs by the adapter's effect).",
        "",
    ]
    _plot_bars(
        out / "inference.png",
        "Inference latency relative to the base model",
        [f"batch {b}" for b in r["batches"]],
        series,
        "× base",
    )
    lines += ["![inference latency](inference.png)", ""]
    return lines


def _sizes(data: dict[str, Any]) -> list[str]:
    lines = _header("Adapter size against model size", data)
    lines += [
        "| model | r | LoRA params | paper | adapter file (LoRA only) | with task head | model (fp32) | "
        "adapter / model |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in data["result"]["models"]:
        lines.append(
            f"| {m['model']} | {m['r']} | {m['lora_params']:,} | {m['paper_lora_params']} | "
            f"{_mb(m['adapter_bytes_lora_only'])} | {_mb(m['adapter_bytes_with_head'])} | "
            f"{_mb(m['model_bytes_fp32'])} | {100 * m['lora_only_fraction_of_model']:.2f}% |"
        )
    lines += [
        "",
        "Query and value adapted. Built on the meta device from configs; the adapter's tensors are "
        "materialised and written by `save_adapter`, so file sizes are exact (safetensors header and "
        "adapter_config.json included). Heads: the 3-label MNLI classifier (DeBERTa: with its pooler). "
        "Model: parameters × 4 bytes. GPT-2's file holds the PEFT-equivalent rank-2r pair on `c_attn` "
        "(stacked A, block B with zero blocks for k), about twice its 393,216 trainable parameters. "
        "The paper's 0.35M for GPT-2 M is below the 24 · 2 · 4 · (1024 + 1024) = 393,216 that q and "
        "v at r = 4 give.",
        "",
    ]
    return lines


def _quality(data: dict[str, Any], out: Path) -> list[str]:
    r = data["result"]
    lines = _header(f"Quality: {r['model']} on real GLUE data", data)
    lines += [
        "| task | train rows × epochs | dev rows | metric | majority class | lorakit LoRA | "
        "full fine-tuning | PEFT LoRA | LoRA − full | train time (lorakit / full / PEFT) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
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
        lines.append(
            f"| {t['task']} | {t['train_rows']} × {t['hyper']['epochs']} | {t['eval_rows']} | "
            f"{t['main_metric']} | {majority} | {scores} | {gap:+.1f} | {times} |"
        )
    hp = r["tasks"][0]["hyper"] if r["tasks"] else {}
    first = r["tasks"][0]["contenders"] if r["tasks"] else {}
    lines += [
        "",
        f"Learning rates: LoRA {r['lr']['lora']:g}, full fine-tuning {r['lr']['full']:g} "
        f"({data['result'].get('lr_source', '')}). Everything else identical: "
        f"batch {hp.get('batch_size')}, "
        f"max length {hp.get('max_length')}, linear schedule with {hp.get('warmup_ratio')} warm-up, "
        f"weight decay {hp.get('weight_decay')}, gradient clipping {hp.get('max_grad_norm')}, "
        f"seed {hp.get('seed')}; "
        "LoRA r = 8, alpha = 16 on query and value, with BERT's pooler and classifier (together the "
        "head RoBERTa calls `classifier`) trained, for lorakit and PEFT alike. Trainable parameters: "
        + ", ".join(f"{NAMES[n]} {_count(c['trainable'])}" for n, c in first.items())
        + ". Majority class: the accuracy of always giving the dev set's most common answer; a score near "
        "it means the model has learnt little yet. Train time is wall-clock on a shared machine.",
        "",
    ]
    _plot_bars(out / "quality.png", "Dev score (main metric)", groups, series, "score")
    lines += ["![quality](quality.png)", ""]
    return lines


def _sweep(data: dict[str, Any]) -> list[str]:
    r = data["result"]
    lines = _header(
        f"Learning-rate sweep: {r['task']}, scored on {r['heldout_rows']} held-out training rows", data
    )
    lines += ["| method | lr | held-out score | train time |", "|---|---:|---:|---:|"]
    for run in sorted(r["runs"], key=lambda x: (x["method"], x["lr"])):
        pick = " (picked)" if r["picks"][run["method"]] == run["lr"] else ""
        lines.append(
            f"| {run['method']} | {run['lr']:g}{pick} | {run['main']:.1f} | {run['train_seconds']:.0f} s |"
        )
    lines += [
        "",
        f"{r['train_rows']} training rows × {r['epochs']} epochs, drawn from SST-2's training file "
        "after the held-out rows were set aside; the dev set was not used for tuning.",
        "",
    ]
    return lines


def _speed_targets(speed: dict[str, Any]) -> list[tuple[str, str, bool]]:
    rows = []
    for m in speed["result"]["models"]:
        q, name = m["ratios"], m["model"]
        for label, key, limit in (
            ("lorakit step ≤ PEFT's (aim 0.90)", "lorakit_over_peft", 1.0),
            ("lorakit step ≤ 0.75 × full", "lorakit_over_full", 0.75),
            ("lorakit step ≤ 0.75 × full with fused AdamW", "lorakit_over_full_fused", 0.75),
        ):
            wall, cpu = q[f"time_{key}"], q[f"cpu_{key}"]
            rows.append((f"{name}: {label}", f"{wall:.2f} ({cpu:.2f})", wall <= limit))
        memory = q["memory_lorakit_over_full"]
        rows.append((f"{name}: LoRA peak memory clearly below full's", f"{memory:.2f}", memory <= 0.9))
    return rows


def _targets(sections: dict[str, Any]) -> list[str]:
    rows = _speed_targets(sections["speed"]) if "speed" in sections else []
    ab = sections["speed"]["result"].get("same_process") if "speed" in sections else None
    if ab:
        wall, cpu = ab["time_lorakit_over_peft"], ab["cpu_lorakit_over_peft"]
        rows.append(
            (f"{ab['model']}, same process: lorakit step ≤ PEFT's", f"{wall:.3f} ({cpu:.3f})", wall <= 1.0)
        )
    if "inference" in sections:
        for batch, s in sections["inference"]["result"]["batches"].items():
            merged = s["lorakit_merged"]
            rows.append(
                (
                    f"batch {batch}: merged within 2% of the base model",
                    f"{merged['ratio_to_base']:.3f} ({merged['cpu_ratio_to_base']:.3f})",
                    merged["ratio_to_base"] <= 1.02,
                )
            )
            ours, theirs = s["lorakit_unmerged"], s["peft_unmerged"]
            rows.append(
                (
                    f"batch {batch}: unmerged overhead ≤ PEFT's",
                    f"{ours['ratio_to_base']:.3f} vs {theirs['ratio_to_base']:.3f} "
                    f"({ours['cpu_ratio_to_base']:.3f} vs {theirs['cpu_ratio_to_base']:.3f})",
                    ours["ratio_to_base"] <= theirs["ratio_to_base"],
                )
            )
    if "quality" in sections:
        for t in sections["quality"]["result"]["tasks"]:
            gap = t["contenders"]["lorakit"]["main"] - t["contenders"]["full"]["main"]
            rows.append((f"{t['task']}: LoRA within 2 points of full", f"{gap:+.1f}", gap >= -2.0))
    if not rows:
        return []
    lines = [
        "## Targets",
        "",
        "Ratios are wall-clock medians, CPU-time medians in brackets; a target counts as met on the "
        "wall-clock figure.",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
    ]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in rows]
    return lines + [""]


def render(out: Path) -> Path:
    """Write ``out/RESULTS.md`` (and PNGs) from the section JSON files in ``out``; returns its path."""
    sections = {
        n: read_json(out / f"{n}.json") for n in ("speed", "inference", "sizes", "quality", "lr-sweep")
    }
    sections = {k: v for k, v in sections.items() if v}
    quick = any(v.get("quick") for v in sections.values())
    lines = [
        "# lorakit benchmarks",
        "",
        "lorakit's LoRA against PEFT's LoRA (same targets, rank, init) and full fine-tuning, measured in one "
        "run by `scripts/bench.py` (`make bench`; `make bench-quick` writes `benchmarks/quick/`). "
        "Contenders are interleaved and figures are medians; ratios compare figures from the same run. "
        "Timings come from a shared 2-core machine, so their absolute values are noisy; the ratios less so."
        + (" **Quick run: small models and subsets; not the headline figures.**" if quick else ""),
        "",
    ]
    lines += _targets(sections)
    if "speed" in sections:
        lines += _speed(sections["speed"], out)
    if "inference" in sections:
        lines += _inference(sections["inference"], out)
    if "sizes" in sections:
        lines += _sizes(sections["sizes"])
    if "quality" in sections:
        lines += _quality(sections["quality"], out)
    if "lr-sweep" in sections:
        lines += _sweep(sections["lr-sweep"])
    path = out / "RESULTS.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
