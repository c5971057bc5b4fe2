"""Your own data, measured: the quick start as a user's CSV against the built-in SST-2 task on the same rows,
and the regression and multilabel examples, each trained by `lorakit train` as a subprocess on the real
MiniLM-L6 (offline, 2 CPU cores).

Rule, fixed before the first run: the own-data demo's dev accuracy equals the built-in task's (the same
rows, labels in the same order, so the same adapter); the script says whether the adapter files are
byte-identical. The examples are reported against a trivial predictor on the same dev rows (multilabel:
every label for every row; regression: the train mean for every row), so that a score can be read.

    python scripts/own_data.py [--out benchmarks]     # writes own-data.json; bench_report adds its section
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name: recipe (relative to the repository root)
    "demo (own CSV)": "configs/demo.yaml",
    "built-in sst2": "configs/minilm-sst2.yaml",
    "regression (STS-B pairs)": "configs/examples/regression-stsb.yaml",
    "multilabel (E2E slots)": "configs/examples/multilabel-e2e-slots.yaml",
}


def _train(recipe: str, out: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", recipe, "--output-dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"{recipe} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _all_labels_baseline(dev: Path) -> dict[str, float]:
    """Micro-F1 and exact match of predicting every label for every row of a multilabel JSONL file."""
    from sklearn.metrics import f1_score

    rows = [json.loads(line)["labels"] for line in dev.read_text().splitlines() if line.strip()]
    names = sorted({n for r in rows for n in r})
    refs = [[int(n in r) for n in names] for r in rows]
    ones = [[1] * len(names) for _ in rows]
    exact = sum(r == o for r, o in zip(refs, ones, strict=True)) / len(rows)
    return {"micro_f1": 100 * f1_score(refs, ones, average="micro"), "exact_match": 100 * exact}


def _mean_baseline(train: Path, dev: Path) -> dict[str, float]:
    """MSE of predicting the train mean score for every dev row (Pearson is undefined for a constant)."""

    def scores(path: Path) -> list[float]:
        with open(path, encoding="utf-8", newline="") as f:
            return [float(r["score"]) for r in csv.DictReader(f)]

    mean = sum(scores(train)) / len(scores(train))
    dev_scores = scores(dev)
    return {"mse": sum((s - mean) ** 2 for s in dev_scores) / len(dev_scores)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args(argv)
    results: dict[str, dict] = {}
    sys.path.insert(0, str(REPO / "scripts"))
    import torch
    from bench_common import environment as measured_on

    environment = measured_on(torch.device("cpu"))  # before the runs: the load average is the start's
    with tempfile.TemporaryDirectory(prefix="lorakit-own-data-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "LORAKIT_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1"}
        for name, recipe in RUNS.items():
            run = root / name.split()[0]
            seconds = _train(recipe, run, env)
            metrics = json.loads((run / "metrics.json").read_text())
            results[name] = {
                "recipe": recipe,
                "main_metric": metrics["main_metric"],
                "best": metrics["best"],
                "wall_seconds": seconds,
                "train_seconds": metrics["train_seconds"],
                "adapter_sha256": _sha256(run / "adapter_model.safetensors"),
            }
    own, builtin = results["demo (own CSV)"], results["built-in sst2"]
    data = REPO / "configs" / "examples" / "data"
    result = {
        **environment,
        "runs": results,
        "demo_rule_met": own["best"]["accuracy"] == builtin["best"]["accuracy"],
        "demo_adapters_identical": own["adapter_sha256"] == builtin["adapter_sha256"],
        "baselines": {
            "multilabel (E2E slots)": _all_labels_baseline(data / "e2e-slots" / "dev.jsonl"),
            "regression (STS-B pairs)": _mean_baseline(
                data / "stsb" / "train.csv", data / "stsb" / "dev.csv"
            ),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "own-data.json").write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    return 0


def render(data: dict) -> str:
    """The RESULTS.md section for ``own-data.json``."""
    lines = [
        "## Your own data (`python scripts/own_data.py`)",
        "",
        f"_{data['date']}, {data['device']}, torch {data['torch']}, transformers {data['transformers']}, "
        f"load average {data['load_average'][0]:.2f} at the start._ Each run is `lorakit train` on the real "
        "MiniLM-L6, as a subprocess; training s is metrics.json's `train_seconds` (the steps).",
        "",
        "| run | recipe | best dev | training s | trivial predictor on the same rows |",
        "|---|---|---|---:|---|",
    ]
    for name, run in data["runs"].items():
        best = ", ".join(f"{k} {v:.2f}" for k, v in run["best"].items() if k != "step")
        base = data["baselines"].get(name)
        trivial = ", ".join(f"{k} {v:.2f}" for k, v in base.items()) if base else ""
        lines.append(f"| {name} | `{run['recipe']}` | {best} | {run['train_seconds']:.0f} | {trivial} |")
    met = "yes" if data["demo_rule_met"] else "**no**"
    same = "byte-identical" if data["demo_adapters_identical"] else "**not** identical"
    lines += [
        "",
        "Rule (fixed before the first run): the own-CSV demo's dev accuracy equals the built-in task's on "
        f"the same rows: {met}; the two adapter files are {same}. Trivial predictors: multilabel, every "
        "label on every row; regression, the train mean on every row.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
