"""A sweep's tables: ``sweep.json`` (every point's record), ``sweep.csv`` (one row a point) and
``sweep.md``, the paper's Table 5/6 shape: one grid key down, one across, each cell the median over the
remaining grid keys (seeds, say) of the points' best main metric, with the range [min–max] beside it.

A cell counts only finished points; failed ones are named in the cell and listed under the table, so no
point drops out unseen. Everything is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lorakit.runs import atomic_write_text, write_json

if TYPE_CHECKING:
    from lorakit.analysis.sweep import Sweep

SWEEP_JSON = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_MD = "sweep.md"

CSV_TAIL = (
    "status",
    "ran",
    "main_metric",
    "best",
    "best_step",
    "final",
    "trainable_parameters",
    "lora_parameters",
    "total_parameters",
    "train_seconds",
    "wall_seconds",
    "run_dir",
    "error",
)


def _show(value: Any) -> str:
    from lorakit.analysis.sweep import show

    return show(value)


def _cell_text(value: Any) -> str:
    return "" if value is None else str(value)  # str(float) is its shortest exact form


def csv_text(records: Sequence[dict[str, Any]], grid_keys: Sequence[str]) -> str:
    """sweep.csv: the point, its grid values as tables show them, then ``CSV_TAIL``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["point", *grid_keys, *CSV_TAIL])
    for r in records:
        params = r.get("parameters") or {}
        tail = {
            **r,
            "trainable_parameters": params.get("trainable"),
            "lora_parameters": params.get("lora"),
            "total_parameters": params.get("total"),
        }
        row = [r["name"], *(_show(r["values"][k]) for k in grid_keys), *(tail.get(c) for c in CSV_TAIL)]
        writer.writerow([_cell_text(v) for v in row])
    return out.getvalue()


def summarize(values: Sequence[float], fmt: Callable[[float], str], range_if_equal: bool = True) -> str:
    """One cell: the value alone, or the median with [min–max] when there are several (unless they are
    all equal and ``range_if_equal`` is off, as for parameter counts)."""
    if len(values) == 1 or (not range_if_equal and min(values) == max(values)):
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}–{fmt(max(values))}]"


def _cells(
    records: Sequence[dict[str, Any]], rows: str, cols: str | None
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        col = _show(r["values"][cols]) if cols else ""
        groups.setdefault((_show(r["values"][rows]), col), []).append(r)
    return groups


def _table(
    records: Sequence[dict[str, Any]],
    grid: dict[str, list[Any]],
    rows: str,
    cols: str | None,
    value: Callable[[dict[str, Any]], float | None],
    fmt: Callable[[float], str],
    corner: str,
    range_if_equal: bool = True,
) -> list[str]:
    groups = _cells(records, rows, cols)
    col_labels = [_show(v) for v in grid[cols]] if cols else [""]
    full = max(len(g) for g in groups.values())
    head = f"| {rows} \\ {cols} |" if cols else f"| {rows} |"
    lines = [head + "".join(f" {c or corner} |" for c in col_labels), "|---|" + "---:|" * len(col_labels)]
    for row_value in grid[rows]:
        label = _show(row_value)
        cells = []
        for col in col_labels:
            group = groups.get((label, col), [])
            done = [v for r in group if r["status"] == "done" and (v := value(r)) is not None]
            failed = sum(r["status"] == "failed" for r in group)
            text = summarize(done, fmt, range_if_equal) if done else ("failed" if failed else "–")
            if done and len(done) < full:
                text += f" (n={len(done)})"
            if done and failed:
                text += f" ({failed} failed)"
            cells.append(text)
        lines.append(f"| {label} |" + "".join(f" {c} |" for c in cells))
    return lines


def _params(kind: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: (r.get("parameters") or {}).get(kind)


def markdown_text(
    records: Sequence[dict[str, Any]],
    grid: dict[str, list[Any]],
    rows: str,
    cols: str | None,
    heading: str,
    context: Sequence[str] = (),
) -> str:
    """sweep.md: the metric table, the parameter-count table, and the failed points with their errors."""
    metrics = {r["main_metric"] for r in records if r["main_metric"]}
    metric = " / ".join(sorted(metrics)) or "main metric"
    rest = [k for k in grid if k not in (rows, cols)]
    over = f"each cell the median over {', '.join(rest)} [min–max]" if rest else "one run a cell"
    counts = {s: sum(r["status"] == s for r in records) for s in ("done", "failed", "not run")}
    lines = [f"# {heading}", "", *context]
    lines += [
        f"{len(records)} points: {counts['done']} done, {counts['failed']} failed, "
        f"{counts['not run']} not run.",
        "",
        f"Best {metric} of each run (its best evaluation); {over}.",
        "",
    ]
    lines += _table(records, grid, rows, cols, lambda r: r["best"], lambda v: f"{v:.2f}", metric)
    heads = sorted({p["trainable"] - p["lora"] for r in records if (p := r.get("parameters"))})
    besides = f"; each run also trains {', '.join(f'{h:,}' for h in heads)} head parameters" if heads else ""
    lines += ["", f"LoRA parameters{besides}:", ""]
    lines += _table(records, grid, rows, cols, _params("lora"), lambda v: f"{int(v):,}", "parameters", False)
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed points:", ""] + [f"- `{r['name']}`: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def write_reports(sweep: Sweep, records: list[dict[str, Any]], jobs: int) -> None:
    """Write sweep.json, sweep.csv and sweep.md into the sweep's root, each atomically."""
    root = sweep.root
    fixed = ", ".join(f"`{k}={_show(v)}`" for k, v in sweep.fixed.items()) or "none"
    grid = " × ".join(f"`{k}` ∈ {{{', '.join(_show(v) for v in vals)}}}" for k, vals in sweep.grid.items())
    context = [f"Base recipe `{sweep.base_recipe}`; fixed: {fixed}; grid: {grid}.", ""]
    summary = {
        "sweep_file": str(sweep.source),
        "recipe": str(sweep.base_recipe),
        "set": sweep.fixed,
        "grid": sweep.grid,
        "output_dir": str(root),
        "rows": sweep.rows,
        "cols": sweep.cols,
        "jobs": jobs,
    }
    write_json(root / SWEEP_JSON, {"sweep": summary, "points": records})
    atomic_write_text(root / SWEEP_CSV, csv_text(records, list(sweep.grid)))
    md = markdown_text(
        records,
        sweep.grid,
        sweep.rows or next(iter(sweep.grid)),
        sweep.cols,
        f"Sweep `{sweep.source}`",
        context,
    )
    atomic_write_text(root / SWEEP_MD, md)
