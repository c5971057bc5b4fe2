"""``lorakit serve`` for real: the CLI started as its own process on 127.0.0.1 with a free port, spoken to
over HTTP with httpx. Three adapters on one tiny RoBERTa with different label counts (SST-2 trained here: 2
labels; STS-B trained here: regression; one written by PEFT: 3 labels). Concurrent requests for all three
come back as ``lorakit predict``'s rows for the same inputs, from batches that mix tasks; adapters load and
unload at run time; every bad request is one line with its status and the server goes on; SIGTERM and
SIGINT finish the requests in flight and exit 0.

The tests of one server run in file order: the last one to use each server stops it with a signal.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import peft_three_label_adapter, save_tiny_roberta, train_glue_run

from lorakit.cli import main
from lorakit.data import subsample
from lorakit.tasks import get_task

TRAINED = {  # name: task, GLUE folder, LoRA section
    "sst2": ("sst2", "SST-2", {"r": 4, "alpha": 8}),
    "stsb": ("stsb", "STS-B", {"r": 2, "alpha": 8, "target_modules": ["value"]}),
    "mrpc": ("mrpc", "MRPC", {"r": 8, "alpha": 16, "target_modules": ["query", "key", "value"]}),
}
SERVED = ("sst2", "stsb", "three")  # mrpc is loaded while serving
ROWS = 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, shared_data: Path) -> dict:
    """The adapters, one trained on another base, and real dev rows for each trained task."""
    from accelerate.state import AcceleratorState, PartialState

    root = tmp_path_factory.mktemp("serve")
    out: dict = {"root": root, "base": tiny_roberta_dir, "rows": {}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(root / "home"))
        for name, (task, folder, lora) in TRAINED.items():
            AcceleratorState._reset_state(True)
            PartialState._reset_state()
            out[name] = train_glue_run(
                root / name, tiny_roberta_dir, task, shared_data / "glue" / folder, lora
            )
            rows = subsample(get_task(task, str(shared_data / "glue" / folder)).load("validation"), ROWS, 1)
            out["rows"][name] = [{"text": r["text_a"], "text_pair": r["text_b"]} for r in rows]
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        wider = save_tiny_roberta(root / "wider", shared_data, hidden_size=48, intermediate_size=96)
        out["other"] = train_glue_run(
            root / "other", wider, "sst2", shared_data / "glue" / "SST-2", {"r": 4, "alpha": 8}
        )
    out["three"] = peft_three_label_adapter(root / "three", tiny_roberta_dir)
    out["rows"]["three"] = [{"text": r["text"]} for r in out["rows"]["sst2"]]
    # Longer than the 48 tokens the runs were trained with: truncated, as in training.
    out["rows"]["sst2"].append({"text": " ".join(["a rather long and winding review"] * 80)})
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``lorakit serve`` process and its log."""

    def __init__(self, runs: dict, names: tuple[str, ...], log: Path, *options: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.signalled = False
        args = [arg for name in names for arg in ("--adapter", f"{name}={runs[name]}")]
        command = [sys.executable, "-m", "lorakit", "serve", *args, "--base", str(runs["base"])]
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port), *options], stdout=sink, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 180
        while True:
            assert self.process.poll() is None, f"the server exited {self.process.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, f"the server did not come up:\n{self.text()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)

    def text(self) -> str:
        return self.log.read_text()

    def send(self, sig: int) -> None:
        self.signalled = True
        self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Exit status, once exited; sends ``sig`` first unless a signal was sent already."""
        if self.process.poll() is None and not self.signalled:
            self.send(sig)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


@pytest.fixture(scope="module")
def server(runs: dict) -> Server:
    """Mixed batches of at most 8 rows, requests of at most 10 inputs, a debug log, a summary a second."""
    options = ("--max-batch-size", "8", "--max-wait-ms", "50", "--max-inputs", "10")
    options += ("--adapter-root", str(runs["root"]))  # loopback, no keys: anyone may load from the root
    server = Server(
        runs, SERVED, runs["root"] / "fast.log", *options, "--log-level", "debug", "--summary-every", "1"
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow_server(runs: dict) -> Server:
    """One merged base copy per adapter, and a request waits 1.5 s for company: long enough to act while
    requests are queued."""
    options = ("--merged", "--max-wait-ms", "1500", "--adapter-root", str(runs["root"]))
    server = Server(runs, SERVED, runs["root"] / "slow.log", *options)
    yield server
    server.stop()


def _reference(runs: dict, requests: list[dict], tmp: Path, capsys: pytest.CaptureFixture[str]) -> list[list]:
    """What ``lorakit predict`` writes for every input of ``requests``, grouped as the requests are."""
    records = [{"adapter": r["adapter"], **row} for r in requests for row in r["inputs"]]
    source, out = tmp / "in.jsonl", tmp / "out.jsonl"
    source.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in records)
    )
    names = sorted({r["adapter"] for r in requests})
    args = [arg for name in names for arg in ("--adapter", f"{name}={runs[name]}")]
    code = main(["predict", *args, "--base", str(runs["base"]), "--input", str(source), "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    grouped, start = [], 0
    for request in requests:
        grouped.append(rows[start : start + len(request["inputs"])])
        start += len(request["inputs"])
    return grouped


def _same(served: list[dict], expected: list[dict]) -> None:
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        assert set(got) == {"adapter", "prediction", "readable", "scores"}
        assert got["adapter"] == want["adapter"]
        if isinstance(want["readable"], str):  # a label: exactly the same; a score: within float noise
            assert (got["prediction"], got["readable"]) == (want["prediction"], want["readable"])
        else:
            assert got["prediction"] == got["readable"] == pytest.approx(want["prediction"], abs=1e-5)
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)  # batches pad differently


async def _post_all(url: str, requests: list[dict], path: str = "/v1/predict") -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post(path, json=r) for r in requests))


def _requests(runs: dict, names: tuple[str, ...]) -> list[dict]:
    """Every dev row of each adapter, in requests of 1 to 3 inputs, shuffled across adapters."""
    requests, rng = [], random.Random(0)
    for name in names:
        rows = runs["rows"][name]
        i = 0
        while i < len(rows):
            size = rng.randint(1, 3)
            requests.append({"adapter": name, "inputs": rows[i : i + size]})
            i += size
    rng.shuffle(requests)
    return requests


def test_concurrent_requests_for_three_adapters_each_equal_lorakit_predict(
    server: Server, runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = _requests(runs, SERVED)
    requests.append({"adapter": "stsb", "inputs": runs["rows"]["stsb"][:10]})  # more than a batch: alone
    responses = asyncio.run(_post_all(server.url, requests))
    for request, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["adapter"] == request["adapter"]
    expected = _reference(runs, requests, tmp_path, capsys)
    for response, want in zip(responses, expected, strict=True):
        _same(response.json()["outputs"], want)
    assert {o["readable"] for r in responses for o in r.json()["outputs"] if o["adapter"] == "sst2"} <= {
        "negative",
        "positive",
    }
    time.sleep(1.5)  # a summary line
    log = server.text()
    batches = re.findall(r"batch: (\d+) rows from (\d+) requests \(([^)]*)\)", log)
    assert batches, log
    mixed = [b for b in batches if len(b[2].split(", ")) > 1]
    assert mixed, "no batch mixed adapters:\n" + log  # one forward pass for rows of several tasks
    assert all(int(rows) <= 8 or int(count) == 1 for rows, count, _ in batches)
    assert sum(int(rows) for rows, _, _ in batches) == sum(len(r["inputs"]) for r in requests)
    assert re.search(r"served \d+ rows in \d+ batches .* rows/s.*queue wait p50", log), log


def _detail(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and "\n" not in body["detail"]
    return body["detail"]


def test_bad_requests_are_one_line_each_and_the_server_goes_on(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        detail = _detail(client.post("/v1/predict", json={"adapter": "nope", "inputs": [{"text": "x"}]}), 404)
        assert "'nope'" in detail and "sst2" in detail
        for body, where in [
            ({"adapter": "sst2", "inputs": [{"text": "x", "oops": 1}]}, "inputs.0.oops"),
            ({"adapter": "sst2", "inputs": []}, "inputs"),
            ({"adapter": "sst2", "inputs": [{"text": ""}]}, "inputs.0.text"),
            ({"adapter": "sst2", "inputs": [{"text": 3}]}, "inputs.0.text"),
            ({"inputs": [{"text": "x"}]}, "adapter"),
        ]:
            assert _detail(client.post("/v1/predict", json=body), 422).startswith(where)
        not_json = client.post(
            "/v1/predict", content=b"{not json", headers={"content-type": "application/json"}
        )
        _detail(not_json, 422)
        too_many = {"adapter": "sst2", "inputs": [{"text": "fine"}] * 11}
        assert "limit of 10" in _detail(client.post("/v1/predict", json=too_many), 413)
        _detail(client.get("/v1/nowhere"), 404)
        ok = client.post("/v1/predict", json={"adapter": "sst2", "inputs": [{"text": "still serving"}]})
        assert ok.status_code == 200 and len(ok.json()["outputs"]) == 1
        assert client.get("/health").json() == {"status": "ok", "adapters": 3}
        assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200


def test_adapters_load_and_unload_while_serving(
    server: Server, runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
        assert list(listed) == list(SERVED)
        assert listed["sst2"] | {"bytes": 0} == {
            "name": "sst2", "path": "sst2", "task": "sst2", "kind": "classification",
            "num_labels": 2, "rank": 4, "alpha": 8.0, "targets": ["query", "value"], "bytes": 0,
        }  # fmt: skip
        assert listed["stsb"]["kind"] == "regression" and listed["stsb"]["targets"] == ["value"]
        assert listed["three"]["num_labels"] == 3 and listed["three"]["task"] is None
        assert all(a["bytes"] > 0 for a in listed.values())

        loaded = client.post("/v1/adapters", json={"name": "mrpc", "path": "mrpc"})
        assert loaded.status_code == 201, loaded.text
        assert loaded.json()["rank"] == 8 and loaded.json()["targets"] == ["key", "query", "value"]
        request = {"adapter": "mrpc", "inputs": runs["rows"]["mrpc"][:10]}
        answer = client.post("/v1/predict", json=request)
        assert answer.status_code == 200, answer.text
        _same(answer.json()["outputs"], _reference(runs, [request], tmp_path, capsys)[0])

        again = client.post("/v1/adapters", json={"name": "mrpc", "path": "mrpc"})
        assert "loaded already" in _detail(again, 409)
        (runs["root"] / "not-an-adapter").mkdir(exist_ok=True)
        not_adapter = client.post("/v1/adapters", json={"name": "x", "path": "not-an-adapter"})
        assert "no adapter" in _detail(not_adapter, 422)
        other_base = client.post("/v1/adapters", json={"name": "y", "path": "other"})
        assert "another base model" in _detail(other_base, 422)
        outside = client.post("/v1/adapters", json={"name": "z", "path": str(runs["mrpc"])})
        assert "relative to the adapter root" in _detail(outside, 403)  # an absolute path
        _detail(client.post("/v1/adapters", json={"name": "bad name", "path": "mrpc"}), 422)

        removed = client.delete("/v1/adapters/mrpc")
        assert removed.status_code == 200 and removed.json()["name"] == "mrpc"
        assert [a["name"] for a in client.get("/v1/adapters").json()["adapters"]] == list(SERVED)
        _detail(client.post("/v1/predict", json=request), 404)
        _detail(client.delete("/v1/adapters/mrpc"), 404)
        assert client.get("/health").json()["adapters"] == 3


def test_the_load_test_client_counts_what_the_server_answers(server: Server, runs: dict) -> None:
    """scripts/bench_serve.py's client, against the real server."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_serve

    rows = {"sst2": runs["rows"]["sst2"], "stsb": runs["rows"]["stsb"]}
    requests = bench_serve._requests(rows, 12, 2, None)
    assert [r["adapter"] for r in requests[:4]] == ["sst2", "stsb", "sst2", "stsb"]
    assert bench_serve._requests(rows, 3, 2, "sst2")[1]["inputs"] == requests[1]["inputs"]  # same inputs
    result = asyncio.run(bench_serve._load(server.url, requests, 3, 60))
    assert (result["requests"], result["rows"], result["errors"], result["complete"]) == (12, 24, 0, True)
    assert 0 < result["latency_p50_ms"] <= result["latency_p99_ms"] and result["rows_per_s"] > 0
    bad = asyncio.run(bench_serve._load(server.url, [{"adapter": "nope", "inputs": [{"text": "x"}]}], 1, 60))
    assert (bad["rows"], bad["errors"]) == (0, 1)


def test_sigint_stops_the_server_with_exit_0(server: Server) -> None:
    """The last test of the fast server."""
    assert server.stop(signal.SIGINT) == 0, server.text()
    assert "stopped" in server.text()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=2)


async def _timed_post(client: httpx.AsyncClient, method: str, path: str, **kw: object) -> tuple:
    response = await client.request(method, path, **kw)
    return response, time.monotonic()


def test_requests_queued_for_an_adapter_finish_before_it_unloads(
    slow_server: Server, runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = {"adapter": "three", "inputs": runs["rows"]["three"][:3]}

    async def scenario() -> tuple:
        async with httpx.AsyncClient(base_url=slow_server.url, timeout=60) as client:
            queued = asyncio.create_task(_timed_post(client, "POST", "/v1/predict", json=request))
            await asyncio.sleep(0.5)  # the request waits in the batcher (1.5 s for company)
            unload = asyncio.create_task(_timed_post(client, "DELETE", "/v1/adapters/three"))
            await asyncio.sleep(0.2)
            later = await client.post("/v1/predict", json=request)
            return await queued, await unload, later

    (queued, queued_done), (unload, unload_done), later = asyncio.run(scenario())
    assert queued.status_code == 200 and unload.status_code == 200, (queued.text, unload.text)
    assert queued_done <= unload_done
    _same(queued.json()["outputs"], _reference(runs, [request], tmp_path, capsys)[0])  # merged == shared base
    _detail(later, 404)


def test_sigterm_finishes_requests_in_flight_and_exits_0(
    slow_server: Server, runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last test of the slow server."""
    requests = _requests(runs, ("sst2", "stsb"))[:4]

    async def scenario() -> list[httpx.Response]:
        sent = asyncio.create_task(_post_all(slow_server.url, requests))
        await asyncio.sleep(0.5)  # in flight: queued, waiting for company
        slow_server.send(signal.SIGTERM)
        return await sent

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * len(requests), [r.text for r in responses]
    for response, want in zip(responses, _reference(runs, requests, tmp_path, capsys), strict=True):
        _same(response.json()["outputs"], want)
    assert slow_server.stop() == 0, slow_server.text()
    assert "stopped" in slow_server.text()


def test_bad_options_are_one_line_before_anything_loads(
    runs: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = ["--adapter", f"sst2={runs['sst2']}"]
    for args, where in [
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--max-wait-ms", "-1"], "--max-wait-ms"),
        (["--log-level", "loud"], "--log-level"),
        (["--adapter", f"b={runs['other']}"], f"--adapter b={runs['other']}"),
    ]:
        assert main(["serve", *adapter, *args]) == 2
        err = capsys.readouterr().err
        assert where in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_the_serve_extra_is_named_when_missing(
    runs: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert main(["serve", "--adapter", f"sst2={runs['sst2']}"]) == 2
    assert "pip install 'lorakit[serve]'" in capsys.readouterr().err


def test_a_busy_port_is_one_line_and_exit_1(runs: dict, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "lorakit",
                "serve",
                "--adapter",
                f"sst2={runs['sst2']}",
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "LORAKIT_HOME": str(tmp_path)},
        )
    assert done.returncode == 1, done.stderr
    assert "address already in use" in done.stderr.lower() and "Traceback" not in done.stderr
