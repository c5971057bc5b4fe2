"""LoRA's trainable-parameter figures (Hu et al., 2021, Table 2), recomputed by ``lorakit info``.

Writes config-only model directories shaped like roberta-base, roberta-large and deberta-v2-xxlarge
(``config.json`` alone: no weights are downloaded or read), describes an MNLI recipe for each with the
paper's rank (query and value adapted, r = 8 for RoBERTa, r = 16 for DeBERTa XXL) and prints the LoRA
parameter counts beside the paper's, with the adapter size and the training-memory estimates.

    python scripts/paper_param_counts.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; fail fast rather than wait
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from rich.console import Console  # noqa: E402  (after the environment above)
from rich.table import Table  # noqa: E402

from lorakit.info import ACTIVATIONS_NOTE, describe, format_bytes  # noqa: E402
from lorakit.paper_models import save_paper_config  # noqa: E402
from lorakit.recipe import recipe_from_dict  # noqa: E402

# name -> (the paper's r, the paper's LoRA figure)
MODELS = {"roberta-base": (8, "0.3M"), "roberta-large": (8, "0.8M"), "deberta-v2-xxlarge": (16, "4.7M")}


def write_config_dirs(root: Path) -> dict[str, Path]:
    """One directory per model in ``root``, each holding only ``config.json``."""
    return {name: save_paper_config(name, root / name) for name in MODELS}


def main() -> int:
    # Wide enough for the table when piped (rich assumes 80 columns without a terminal).
    console = Console(width=max(Console().width, 150))
    table = Table(title="LoRA parameter counts on MNLI (query, value adapted), from config.json alone")
    for column in ("model", "r", "LoRA params", "paper", "trainable (incl. head)", "adapter"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for column in ("memory: LoRA", "memory: full FT", "describe"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="lorakit-paper-") as tmp:
        dirs = write_config_dirs(Path(tmp))
        # One untimed run first, so the timings show describe itself, not transformers' lazy imports.
        describe(recipe_from_dict({"model": {"name_or_path": str(dirs["roberta-base"])}}, "warm-up"))
        for name, path in dirs.items():
            r, paper = MODELS[name]
            recipe = recipe_from_dict(
                {"model": {"name_or_path": str(path)}, "task": {"name": "mnli"}, "lora": {"r": r}}, name
            )
            start = time.perf_counter()
            report = describe(recipe)
            seconds = time.perf_counter() - start
            c = report.counts
            table.add_row(
                name,
                str(r),
                f"{c.lora:,}",
                paper,
                f"{c.trainable:,} ({c.trainable_percent:.2f}%)",
                f"{report.saved_bytes / 1e6:.1f} MB",
                format_bytes(report.memory_lora.total),
                format_bytes(report.memory_full.total),
                f"{seconds:.2f} s",
            )
    console.print(table)
    console.print(
        "LoRA params: A and B of every adapted W_q and W_v. Trainable adds the MNLI head (3 labels; "
        "DeBERTa's pooler too). Adapter: the trainable tensors at their dtype (fp32), as saved. "
        f"Memory: fp32 training. {ACTIVATIONS_NOTE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
