"""Many tasks on one base, for real: the real MiniLM-L6 with adapters trained here on SST-2, MRPC and STS-B
(`lorakit train`), each scored alone (`lorakit eval`), then one `lorakit predict` over a shuffled file of
all three dev sets; each task's dev metric from that one mixed run against its own `lorakit eval`.

    python scripts/many_tasks.py --out benchmarks          # writes benchmarks/many-tasks.json, prints a table

Every step is the CLI itself, run as a subprocess. Training follows configs/minilm-sst2.yaml with the task,
its rows and the LoRA learning rate an earlier small-budget sweep picked for it (written below).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "glue"
# task -> (GLUE folder, training rows, LoRA learning rate)
TASKS = {"sst2": ("SST-2", 1500, 2e-3), "mrpc": ("MRPC", 800, 5e-3), "stsb": ("STS-B", 600, 5e-3)}


def lorakit(*args: str, env: dict[str, str]) -> float:
    """Run ``lorakit ARGS`` as its own process; returns its wall time; raises when it fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"lorakit {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--quick", action="store_true", help="100 training rows and 64 dev rows a task")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from lorakit.data import subsample
    from lorakit.runs import write_json
    from lorakit.tasks import get_task

    with tempfile.TemporaryDirectory(prefix="lorakit-many-tasks-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "LORAKIT_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1"}
        runs, seconds, dev_rows = {}, {}, {}
        for name, (folder, rows, lr) in TASKS.items():
            run = root / name
            overrides = {
                "task.name": name,
                "task.data_dir": str(DATA / folder),
                "task.max_train_samples": 100 if args.quick else rows,
                "train.lr": lr,
            }
            if args.quick:
                overrides["task.max_eval_samples"] = 64
            sets = [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]
            seconds[f"train {name}"] = lorakit(
                "train", str(REPO / "configs/minilm-sst2.yaml"), *sets, "--output-dir", str(run), env=env
            )
            seconds[f"eval {name}"] = lorakit("eval", str(run), env=env)
            runs[name] = run
            task = get_task(name, str(DATA / folder))
            dev_rows[name] = subsample(task.load("validation"), 64 if args.quick else None, 0)

        lines = [(name, i) for name, rows in dev_rows.items() for i in range(len(rows))]
        random.Random(0).shuffle(lines)
        source, predicted = root / "mixed.jsonl", root / "predicted.jsonl"
        with source.open("w") as f:
            for name, i in lines:
                row = dev_rows[name][i]
                record = {"adapter": name, "text": row["text_a"]}
                if row["text_b"] is not None:
                    record["text_pair"] = row["text_b"]
                f.write(json.dumps(record) + "\n")
        adapters = [arg for name, run in runs.items() for arg in ("--adapter", f"{name}={run}")]
        seconds["predict (mixed)"] = lorakit(
            "predict", *adapters, "--input", str(source), "--output", str(predicted), env=env
        )

        outputs = [json.loads(line) for line in predicted.read_text().splitlines()]
        by_task: dict[str, list] = {name: [None] * len(rows) for name, rows in dev_rows.items()}
        for (name, i), out in zip(lines, outputs, strict=True):
            assert out["adapter"] == name
            by_task[name][i] = out["prediction"]
        tasks = []
        for name, run in runs.items():
            task = get_task(name, str(DATA / TASKS[name][0]))
            mixed = task.compute_metrics(by_task[name], dev_rows[name])
            alone = json.loads((run / "eval" / "metrics-validation.json").read_text())
            evaluated = [
                json.loads(x)["prediction"]
                for x in (run / "eval" / "predictions-validation.jsonl").read_text().splitlines()
            ]
            same = (
                sum(a == b for a, b in zip(evaluated, by_task[name], strict=True))
                if task.kind != "regression"
                else None
            )
            worst = (
                max(abs(a - b) for a, b in zip(evaluated, by_task[name], strict=True))
                if task.kind == "regression"
                else None
            )
            tasks.append(
                {
                    "task": name,
                    "metric": task.main_metric,
                    "dev_rows": len(dev_rows[name]),
                    "eval_alone": alone[task.main_metric],
                    "predict_mixed": mixed[task.main_metric],
                    "same_predictions": same,
                    "max_abs_difference": worst,
                }
            )
    result = {"rows": len(lines), "seconds": seconds, "tasks": tasks, "quick": args.quick}
    out = args.out / ("quick" if args.quick else "") / "many-tasks.json"
    write_json(out, result)
    print("| task | dev rows | metric | `lorakit eval` alone | one mixed `lorakit predict` | rows alike |")
    print("|---|---:|---|---:|---:|---|")
    for t in tasks:
        if t["same_predictions"] is None:
            alike = f"max |Δ| {t['max_abs_difference']:.1e}"
        else:
            alike = f"{t['same_predictions']} / {t['dev_rows']}"
        scores = f"{t['eval_alone']:.2f} | {t['predict_mixed']:.2f}"
        print(f"| {t['task']} | {t['dev_rows']} | {t['metric']} | {scores} | {alike} |")
    took = seconds["predict (mixed)"]
    print(f"\n{len(lines)} rows in one mixed run: {took:.1f} s (the whole process); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
