"""``train.compile``: the demo run (configs/demo.yaml, real MiniLM, SST-2) through ``lorakit train``, eager
and compiled, whole processes timed alternately, round by round.

    python scripts/bench_compile.py --rounds 2 --out benchmarks     # about 10 minutes on 2 CPU cores

Reported per round: the whole run's wall time (start-up, Inductor's compilation, training, evaluation,
saving), the training loop's own samples/s (``metrics.json``: the optimizer steps, including those that
compile a graph: length-grouped batches bring new sequence lengths), the dev accuracy (dropout draws other
masks when compiled, so it may differ), and the compiled run's graph breaks.

The rule, fixed before the first run (issue 16): ``train.compile`` stays off by default unless the
compiled run wins everywhere measured, that is both the median wall-time ratio compiled / eager < 1 and
the median samples/s ratio > 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(out: Path, compiled: bool) -> dict:
    """One whole ``lorakit train`` process; its wall time and what its metrics.json says."""
    cmd = [sys.executable, "-m", "lorakit", "train", "configs/demo.yaml", "--output-dir", str(out)]
    cmd += ["--set", f"train.compile={'true' if compiled else 'false'}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench_compile: lorakit train failed:\n{done.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "wall_s": wall,
        "train_seconds": metrics["train_seconds"],
        "samples_per_second": metrics["train_samples_per_second"],
        "accuracy": metrics["best"]["accuracy"],
        "compile": metrics.get("compile"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {"eager": [], "compiled": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            # Alternate which goes first, so neither always meets the machine in the same state.
            order = ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager")
            for name in order:
                runs[name].append(_run(Path(tmp) / f"{name}-{i}", name == "compiled"))
                print(f"[bench_compile] round {i + 1} {name}: {runs[name][-1]}", flush=True)
    ratios = {
        key: [c[key] / e[key] for c, e in zip(runs["compiled"], runs["eager"], strict=True)]
        for key in ("wall_s", "samples_per_second")
    }
    medians = {key: statistics.median(v) for key, v in ratios.items()}
    wins = medians["wall_s"] < 1 and medians["samples_per_second"] > 1
    result = {"rounds": args.rounds, "runs": runs, "ratios": ratios, "medians": medians, "compile_wins": wins}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| run | wall s (median) | train samples/s (median) | dev accuracy | graph breaks |")
    print("|---|---|---|---|---|")
    for name, rs in runs.items():
        breaks = rs[0]["compile"]["graph_breaks"] if rs[0]["compile"] else "-"
        wall = statistics.median(r["wall_s"] for r in rs)
        speed = statistics.median(r["samples_per_second"] for r in rs)
        accuracy = ", ".join(f"{r['accuracy']:.2f}" for r in rs)
        print(f"| {name} | {wall:.1f} | {speed:.1f} | {accuracy} | {breaks} |")
    print(f"compiled / eager: wall {medians['wall_s']:.3f}, samples/s {medians['samples_per_second']:.3f}")
    print(f"compile wins everywhere measured: {'yes' if wins else 'no: the default stays off'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
