"""Formatting shared by the RESULTS.md renderers: contender names, colours, units, headers, bar plots."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

NAMES = {
    "lorakit": "lorakit LoRA",
    "peft": "PEFT LoRA",
    "full": "full fine-tuning",
}
# One colour per contender in every plot.
COLORS = {
    "lorakit LoRA": "tab:blue",
    "PEFT LoRA": "tab:orange",
    "full fine-tuning": "tab:green",
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


def mib(n: float) -> str:
    """A byte count in MiB, or GiB from 1 GiB up."""
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def count(n: int) -> str:
    """A parameter count: millions from 100,000 up, else the exact number."""
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def round_ratio(x: dict[str, Any], y: dict[str, Any]) -> str:
    """Median over rounds of x's time over y's in the same round (wall clock, then CPU time in brackets);
    ``x`` and ``y`` are summaries of interleaved timings, round i being each one's i-th; where one ran in
    fewer rounds (full fine-tuning may), the rounds both ran in."""
    n = min(x["reps"], y["reps"])
    wall = statistics.median(a / b for a, b in zip(x["times_s"][:n], y["times_s"][:n], strict=True))
    cpu = statistics.median(a / b for a, b in zip(x["cpu_times_s"][:n], y["cpu_times_s"][:n], strict=True))
    return f"{wall:.2f} ({cpu:.2f})"


def ms(s: float) -> str:
    """Seconds as milliseconds, one decimal below a second."""
    return f"{s * 1e3:,.0f} ms" if s >= 1 else f"{s * 1e3:,.1f} ms"


def header(name: str, data: dict[str, Any]) -> list[str]:
    """A section's heading and its run's circumstances: date, device, threads, versions, load, duration."""
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


def plot_bars(path: Path, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
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
