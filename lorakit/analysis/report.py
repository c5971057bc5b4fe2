"""The files ``lorakit analyze`` writes from its measurements: analysis.json (everything), analysis.md
(the Table 7-style table per run, the subspace-similarity summary) and PNG plots (singular-value
spectra; φ heatmaps of the first, middle and last layer's modules beside their chance level)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lorakit.runs import atomic_write_text, write_json

_LAYER = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The first layer index in a module path (``...layer.3.attention...`` -> 3), or None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _kind(name: str) -> str:
    """What the module is within its layer: its last path component, with the slice (``c_attn[q]``)."""
    return name.rsplit(".", 1)[-1]


def picked_layers(names: list[str]) -> list[int | None]:
    """First, middle and last layer among ``names`` (fewer when there are fewer layers)."""
    layers = sorted({layer_of(n) for n in names}, key=lambda x: -1 if x is None else x)
    picks = [layers[0], layers[len(layers) // 2], layers[-1]] if layers else []
    return list(dict.fromkeys(picks))


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def table7(modules: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows of the Table 7-style table: one row per module."""
    rows = [
        "| module | r | ‖ΔW‖_F | ‖UᵀWV‖_F, U,V of ΔW | of W (top r) | random | ‖W‖_F | amplification "
        "| effective rank | energy of σ₁ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in modules.items():
        rows.append(
            f"| `{name}` | {m['rank']} | {_num(m['delta_fro'])} | {_num(m.get('projection_fro'))} "
            f"| {_num(m.get('w_top_projection_fro'))} | {_num(m.get('random_projection_fro'))} "
            f"| {_num(m.get('w_fro'), 2)} | {_num(m.get('amplification'), 2)} "
            f"| {_num(m['effective_rank'], 2)} | {_num(m['energy'][0] if m['energy'] else None)} |"
        )
    return rows


def similarity_rows(modules: dict[str, dict[str, Any]], top: int) -> list[str]:
    """Markdown rows of the φ summary: φ(1,1) and the mean over i, j ≤ top, each against chance."""
    rows = [
        f"| module | φ(1,1) | random | mean φ, i,j ≤ {top} | random |",
        "|---|---|---|---|---|",
    ]
    for name, m in modules.items():
        if "phi_11" in m:
            rows.append(
                f"| `{name}` | {m['phi_11']:.3f} | {m['random_phi_11']:.3f} "
                f"| {m['phi_mean_top']:.3f} | {m['random_phi_mean_top']:.3f} |"
            )
    return rows


def markdown(data: dict[str, Any]) -> str:
    """analysis.md: the tables, and pointers to the plots."""
    lines = [f"# Adapter analysis: `{data['run']}`", "", f"Base model: `{data['base_model']}`.", ""]
    lines += [
        "ΔW = (alpha/r)·B·A as applied, laid out (out, in). ‖UᵀWV‖_F projects the base weight W onto",
        "r-dimensional subspaces: ΔW's own singular vectors, W's top-r ones, and random orthonormal ones",
        f"(mean of {data['random_draws']} draws); amplification = ‖ΔW‖_F / ‖UᵀWV‖_F with ΔW's U, V.",
        "",
        "## This run",
        "",
        *table7(data["modules"]),
        "",
    ]
    if data.get("compare"):
        lines += [f"## Compared run: `{data['compare']}`", "", *table7(data["compare_modules"]), ""]
        lines += [
            "## Subspace similarity of the lora_A row spaces",
            "",
            "φ(i, j) = ‖U_iᵀ U_j‖_F² / min(i, j) between the top-i right-singular vectors of this run's A",
            "and the top-j of the compared run's; random: the same for Gaussian matrices of the same shapes",
            "(expected max(i, j)/in).",
            "",
            *similarity_rows(data["modules"], data["top"]),
            "",
            "![subspace similarity](subspace_similarity.png)",
            "",
        ]
    lines += ["![singular values](singular_values.png)", ""]
    return "\n".join(lines)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def plot_spectra(data: dict[str, Any], path: Path) -> None:
    """singular_values.png: σ_i of every module's ΔW (log scale), one panel per run."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    runs = [("this run", data["modules"])]
    if data.get("compare"):
        runs.append(("compared run", data["compare_modules"]))
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, (title, modules) in zip(axes[0], runs, strict=True):
        # Colour by layer (dark: first, light: last), line style by module kind: 12+ lines stay apart.
        layers = sorted({layer_of(n) for n in modules}, key=lambda x: -1 if x is None else x)
        kinds = list(dict.fromkeys(_kind(n) for n in modules))
        cmap = plt.get_cmap("viridis")
        for name, m in modules.items():
            s = [x for x in m["singular_values"] if x > 0]
            if not s:
                continue
            layer = layer_of(name)
            color = cmap(0.9 * layers.index(layer) / max(len(layers) - 1, 1))
            style = ("-", "--", ":", "-.")[kinds.index(_kind(name)) % 4]
            label = f"layer {layer} {_kind(name)}" if layer is not None else name
            ax.semilogy(range(1, len(s) + 1), s, marker=".", ms=3, lw=1, ls=style, color=color, label=label)
        ax.set(title=f"{title}: singular values of ΔW", xlabel="i", ylabel="σ_i")
        ax.grid(alpha=0.3)
        if len(modules) <= 24:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def _heatmap(ax: Any, grid: list[list[float]], title: str) -> Any:
    """φ(i, j) with i (this run) down and j (the compared run) across, both counted from 1."""
    extent = (0.5, len(grid[0]) + 0.5, len(grid) + 0.5, 0.5)
    image = ax.imshow(grid, vmin=0, vmax=1, aspect="auto", cmap="viridis", extent=extent)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("j (compared run)", fontsize=7)
    ax.set_ylabel("i (this run)", fontsize=7)
    return image


def plot_similarity(data: dict[str, Any], path: Path) -> None:
    """subspace_similarity.png: φ heatmaps of the first, middle and last layer's modules (one row per
    module kind) and, in the last column, the random baseline of the first picked module of that kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = {n: m for n, m in data["modules"].items() if "subspace_similarity" in m}
    layers = picked_layers(list(modules))
    kinds = list(dict.fromkeys(_kind(n) for n in modules))
    cols = len(layers) + 1
    fig, axes = plt.subplots(
        len(kinds), cols, figsize=(3.2 * cols, 2.8 * len(kinds)), squeeze=False, layout="constrained"
    )
    image = None
    for row, kind in zip(axes, kinds, strict=True):
        names = [n for n in modules if _kind(n) == kind]
        first = None
        for ax, layer in zip(row[:-1], layers, strict=True):
            name = next((n for n in names if layer_of(n) == layer), None)
            if name is None:
                ax.set_axis_off()
                continue
            first = first or name
            image = _heatmap(ax, modules[name]["subspace_similarity"], f"{kind}, layer {layer}")
        if first is not None:
            _heatmap(row[-1], modules[first]["random_subspace_similarity"], f"random, shapes of {kind}")
        else:
            row[-1].set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="φ(i, j)")
    _save(fig, path)


def write_report(out: Path, data: dict[str, Any]) -> None:
    """Write analysis.json, analysis.md and the plots into ``out`` (a fresh directory)."""
    write_json(out / "analysis.json", data)
    atomic_write_text(out / "analysis.md", markdown(data))
    plot_spectra(data, out / "singular_values.png")
    if data.get("compare"):
        plot_similarity(data, out / "subspace_similarity.png")
