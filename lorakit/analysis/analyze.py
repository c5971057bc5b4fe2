"""``lorakit analyze``: the paper's section 7 measurements of one trained adapter, or of two side by side.

Per adapted module (each adapted slice of a fused projection on its own): ΔW's norm, singular values,
energy and effective rank; with the base model's W0, how much of W0 lies in ΔW's own subspaces against
W0's top ones and random ones, and the amplification ‖ΔW‖_F / ‖Uᵀ W0 V‖_F (Table 7). With a second run,
the subspace similarity φ(i, j) of the two ``lora_A`` row spaces and its chance level (Figures 3, 4).
Writes analysis.json, analysis.md and PNG plots into the output directory (``report``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lorakit.analysis import spectra
from lorakit.analysis.updates import AdapterSource, ModuleUpdate, base_weights, open_adapter
from lorakit.errors import UserError
from lorakit.outputs import check_out, write_dir

MARKER = "analysis.json"
RANDOM_DRAWS = 10  # random orthonormal U, V pairs averaged in random_projection_fro
TOP = 8  # the φ summary averages the grid over i, j ≤ TOP (the paper's Figure 3 zooms to 8 × 8)


@dataclass
class AnalysisResult:
    """Where the analysis went and what it holds (the content of analysis.json)."""

    out: Path
    data: dict[str, Any]


def default_out(run_dir: Path) -> Path:
    """``RUN_DIR/analysis``."""
    return run_dir / "analysis"


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None  # JSON has no inf: None where W0 has nothing in ΔW's subspaces


def module_stats(
    update: ModuleUpdate, w0: torch.Tensor | None, w_svd: spectra.Svd | None = None
) -> dict[str, Any]:
    """One module's figures (floats and lists, ready for JSON); without ``w0`` only ΔW's own. ``w_svd``:
    W0's SVD when already at hand (two runs on one base share it: the costliest step, done once)."""
    svd = spectra.low_rank_svd(update.b, update.a, update.scale)
    s = svd.s
    stats: dict[str, Any] = {
        "rank": update.rank,
        "shape": [int(update.b.shape[0]), int(update.a.shape[1])],
        "scale": update.scale,
        "delta_fro": float(torch.linalg.vector_norm(s)),
        "singular_values": s.tolist(),
        "energy": spectra.energy(s).tolist(),
        "effective_rank": spectra.effective_rank(s),
    }
    if w0 is None:
        return stats
    r = update.rank
    w_svd = w_svd if w_svd is not None else spectra.matrix_svd(w0)
    stats["w_fro"] = float(torch.linalg.matrix_norm(w0.double()))
    stats["projection_fro"] = spectra.projection_fro(w0, svd.u, svd.v)
    stats["w_top_projection_fro"] = spectra.projection_fro(w0, w_svd.u[:, :r], w_svd.v[:, :r])
    stats["random_projection_fro"] = spectra.random_projection_fro(w0, r, RANDOM_DRAWS, seed=0)
    stats["amplification"] = _ratio(stats["delta_fro"], stats["projection_fro"])
    return stats


def similarity_stats(a: ModuleUpdate, b: ModuleUpdate, seed: int) -> dict[str, Any]:
    """φ(i, j) of two modules' ``lora_A`` row spaces, and the same for random Gaussian matrices of the
    same shapes, with the summary figures the report shows."""
    if a.a.shape[1] != b.a.shape[1]:
        raise UserError(f"{a.name}: input sizes {a.a.shape[1]} and {b.a.shape[1]} differ between the runs")
    phi = spectra.subspace_similarity(spectra.row_space_basis(a.a), spectra.row_space_basis(b.a))
    rand = spectra.random_subspace_similarity(int(a.a.shape[1]), a.rank, b.rank, seed)
    ti, tj = min(TOP, a.rank), min(TOP, b.rank)
    return {
        "subspace_similarity": phi.tolist(),
        "random_subspace_similarity": rand.tolist(),
        "phi_11": float(phi[0, 0]),
        "random_phi_11": float(rand[0, 0]),
        "phi_mean_top": float(phi[:ti, :tj].mean()),
        "random_phi_mean_top": float(rand[:ti, :tj].mean()),
    }


def _base_name(source: AdapterSource) -> str | None:
    if source.recipe is not None:
        return str(source.recipe.model.name_or_path)
    return source.file_config.get("base_model_name_or_path")


def _measure(
    source: AdapterSource,
    weights: dict[str, torch.Tensor],
    w_svds: dict[str, spectra.Svd],
    progress: Progress,
    label: str,
) -> dict[str, Any]:
    task = progress.add_task(label, total=len(source.updates))
    modules = {}
    for update in source.updates:
        w0 = weights.get(update.name)
        if w0 is not None and update.name not in w_svds:
            w_svds[update.name] = spectra.matrix_svd(w0)
        modules[update.name] = module_stats(update, w0, w_svds.get(update.name))
        progress.advance(task)
    return modules


def analyze(
    run_dir: Path, compare: Path | None = None, out: Path | None = None, console: Console | None = None
) -> AnalysisResult:
    """Analyze ``run_dir``'s adapter (against ``compare``'s when given) and write the report to ``out``
    (default ``RUN_DIR/analysis``); returns where it went and analysis.json's content."""
    from lorakit.analysis.report import write_report

    out = Path(out) if out is not None else default_out(Path(run_dir))
    check_out(out, MARKER, "analyze")
    first = open_adapter(Path(run_dir), "RUN_DIR")
    second = open_adapter(Path(compare), "--compare") if compare is not None else None
    weights = base_weights(first)
    data: dict[str, Any] = {
        "lorakit": "analyze",
        "run": str(run_dir),
        "base_model": _base_name(first),
        "compare": str(compare) if compare is not None else None,
        "random_draws": RANDOM_DRAWS,
        "top": TOP,
    }
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True)) as progress:
        w_svds: dict[str, spectra.Svd] = {}
        data["modules"] = _measure(first, weights, w_svds, progress, "analyze")
        if second is not None:
            same_base = _base_name(second) == _base_name(first)
            weights_b = weights if same_base else base_weights(second)
            data["compare_modules"] = _measure(
                second, weights_b, w_svds if same_base else {}, progress, "compare"
            )
            by_name = {u.name: u for u in second.updates}
            common = [u for u in first.updates if u.name in by_name]
            if not common:
                raise UserError(f"no adapted module in common with {run_dir}", where=str(compare))
            task = progress.add_task("similarity", total=len(common))
            for seed, update in enumerate(common):
                data["modules"][update.name].update(similarity_stats(update, by_name[update.name], seed))
                progress.advance(task)
    write_dir(out, lambda tmp: write_report(tmp, data))
    return AnalysisResult(out, data)


def summary_lines(data: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: per module rank, ‖ΔW‖_F, amplification and (with a compared run)
    φ(1, 1) against its chance level."""
    lines = []
    for name, m in data["modules"].items():
        line = f"{name}: r {m['rank']}, |dW|_F {m['delta_fro']:.3g}"
        if m.get("amplification") is not None:
            line += f", amplification {m['amplification']:.3g}"
        if "phi_11" in m:
            line += f", phi(1,1) {m['phi_11']:.3f} (random {m['random_phi_11']:.3f})"
        lines.append(line)
    return lines
