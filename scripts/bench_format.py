"""How benchmark figures are written into RESULTS.md: times, sizes, intervals, tables, bar charts."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def ms(s: float) -> str:
    """Seconds as milliseconds."""
    return f"{s * 1e3:,.0f} ms" if abs(s) >= 1 else f"{s * 1e3:,.2f} ms"


NAMES = {"lorakit": "lorakit LoRA", "peft": "PEFT LoRA", "full": "full fine-tuning"}


def mib(n: float) -> str:
    """Bytes as MiB (GiB from 1 GiB)."""
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def ci(stats: dict[str, Any], key: str = "ratio") -> str:
    """A ratio (or difference) median with its 95% interval in brackets."""
    if key == "ratio":
        low, high = stats["ratio_ci95"]
        return f"{stats['ratio_median']:.3f} [{low:.3f}, {high:.3f}]"
    low, high = stats["ci95_s"]
    return f"{ms(stats['median_s'])} [{ms(low)}, {ms(high)}]"


def header(title: str, data: dict[str, Any]) -> list[str]:
    """A section's title and the line saying when, where and how long it ran."""
    env = data["environment"]
    load = env.get("load_average")
    load_txt = f", load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at start" if load else ""
    return [
        f"## {title}",
        "",
        f"_{env['date']}, {env['device']}, {env['torch_threads']} threads, torch {env['torch']}, "
        f"transformers {env['transformers']}, peft {env['peft']}{load_txt}; took {data['seconds']:.0f} s._",
        "",
    ]


def table(head: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows] + [""]


def bars(path: Path, title: str, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    """A grouped bar chart saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        ax.bar(
            [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))], values, width, label=label
        )
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
