"""``lorakit serve`` exposed: API keys, adapter loading contained in ``--adapter-root``, size limits, the
bounded queue and its timeout, 500s that leak nothing, and ``/metrics`` counting what was sent.

Each server is the real CLI in its own process on 127.0.0.1. The secured one runs under an audit hook
(``sys.addaudithook``) that records every file or directory the process opens under two folders: the
start-up adapter's (so the hook is seen to work) and a folder outside the root holding a valid adapter
that symlinks point at (which must never appear). Adapters are PEFT folders on the tiny RoBERTa: no
training, so the module stays quick.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from conftest import peft_three_label_adapter, save_tiny_roberta
from prometheus_client.parser import text_string_to_metric_families

from lorakit.cli import main

API_KEY = "api-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
HOOK = """
import os, sys
watched, log = sys.argv[1].split(os.pathsep), sys.argv[2]
del sys.argv[1:3]
def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes)):
        path = os.fsdecode(args[0])
        if any(path.startswith(w) for w in watched):
            with open(log, "a") as f:
                f.write(event + " " + path + "\\n")
sys.addaudithook(hook)
from lorakit.cli import main
sys.exit(main())
"""


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``lorakit serve`` process (optionally under the audit hook) and its log."""

    def __init__(self, args: list[str], log: Path, hook: tuple[list[Path], Path] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        if hook is None:
            command = [sys.executable, "-m", "lorakit"]
        else:
            script = log.with_suffix(".hook.py")
            script.write_text(textwrap.dedent(HOOK))
            command = [sys.executable, str(script), os.pathsep.join(map(str, hook[0])), str(hook[1])]
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                [*command, "serve", *args, "--port", str(self.port)], stdout=sink, stderr=subprocess.STDOUT
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

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def metrics(url: str, key: str | None = API_KEY) -> dict[tuple[str, tuple], float]:
    """Every sample of ``GET /metrics``, parsed by prometheus-client: (name, sorted labels) -> value."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, shared_data: Path) -> dict:
    """The adapter root and what lies around it."""
    top = tmp_path_factory.mktemp("serve-security")
    root, outside, startup = top / "root", top / "outside", top / "startup"
    for folder in (root, outside, startup):
        folder.mkdir()
    peft_three_label_adapter(startup / "start", tiny_roberta_dir)
    peft_three_label_adapter(outside / "adapter", tiny_roberta_dir)
    (outside / "secret.txt").write_text("not for clients")
    for name in ("good1", "good2", "good3"):
        peft_three_label_adapter(root / name, tiny_roberta_dir)
    (root / "escape").symlink_to(outside / "adapter")  # a symlink out of the root
    (root / "escape-relative").symlink_to(Path("..") / "outside" / "adapter")
    sneaky = root / "sneaky"  # a directory inside whose weights file points out
    sneaky.mkdir()
    for name in os.listdir(outside / "adapter"):
        (sneaky / name).symlink_to(outside / "adapter" / name)
    (root / "inside-link").symlink_to(root / "good3")  # a symlink that stays inside: fine
    (root / "a-file.txt").write_text("a file")
    (root / "empty").mkdir()
    wider = save_tiny_roberta(top / "wider", shared_data, hidden_size=48, intermediate_size=96)
    peft_three_label_adapter(root / "otherbase", wider)
    return {"top": top, "root": root, "outside": outside, "startup": startup, "base": tiny_roberta_dir}


@pytest.fixture(scope="module")
def secured(tree: dict) -> Server:
    """Keys, an admin key, the root, at most 3 adapters, 64 KiB bodies, 8 inputs of 1,000 characters."""
    args = ["--adapter", f"start={tree['startup'] / 'start'}", "--base", str(tree["base"])]
    args += ["--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--adapter-root", str(tree["root"])]
    args += ["--max-adapters", "3", "--max-body-bytes", "65536", "--max-inputs", "8"]
    args += ["--max-input-chars", "1000"]
    hook_log = tree["top"] / "opened.log"
    server = Server(args, tree["top"] / "secured.log", ([tree["outside"], tree["startup"]], hook_log))
    server.opened = hook_log  # type: ignore[attr-defined]
    yield server
    server.stop()


def _client(server: Server, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def _one_line(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and "\n" not in body["detail"], body
    return body["detail"]


PREDICT = {"adapter": "start", "inputs": [{"text": "a fine film"}, {"text": "a dull one"}]}


def test_every_route_but_health_needs_a_key_and_nothing_is_computed_without_one(secured: Server) -> None:
    before = metrics(secured.url)
    with _client(secured, None) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for method, path in [
            ("GET", "/v1/adapters"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/docs"),
            ("POST", "/v1/predict"), ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/start"),
        ]:  # fmt: skip
            response = anonymous.request(method, path, json=PREDICT if method == "POST" else None)
            assert "API key" in _one_line(response, 401)
            assert response.headers["www-authenticate"] == "Bearer"
    for header in ["Bearer wrong-key-0123456789abcdef", f"Basic {API_KEY}", f"Bearer {API_KEY}x", "Bearer"]:
        response = httpx.post(secured.url + "/v1/predict", json=PREDICT, headers={"Authorization": header})
        _one_line(response, 401)
    after = metrics(secured.url)
    assert delta(after, before, "lorakit_rejected_requests_total", reason="unauthorized") == 11
    assert delta(after, before, "lorakit_batch_rows_count") == 0  # nothing computed
    for key in (API_KEY, ADMIN_KEY):
        with _client(secured, key) as client:
            assert client.post("/v1/predict", json=PREDICT).status_code == 200
            assert [a["name"] for a in client.get("/v1/adapters").json()["adapters"]] == ["start"]
    with _client(secured, API_KEY) as client:  # an API key is not an admin key
        refused = client.post("/v1/adapters", json={"name": "g", "path": "good1"})
        assert "admin-key" in _one_line(refused, 403)
        _one_line(client.delete("/v1/adapters/start"), 403)
    log = secured.text()
    assert API_KEY not in log and ADMIN_KEY not in log
    assert "admin load by=key-" in log and "adapter='g' path='good1': refused (403" in log


def test_loading_stays_inside_the_root_and_reads_nothing_outside(secured: Server, tree: dict) -> None:
    with _client(secured, ADMIN_KEY) as client:
        for path in [
            str(tree["root"] / "good1"),  # absolute, even inside the root
            str(tree["outside"] / "adapter"),
            "../outside/adapter",
            "good1/../../outside/adapter",
            "escape",
            "escape-relative",
            "escape/adapter_config.json",
            "sneaky",
            "a-file.txt",
            "missing",
        ]:
            detail = _one_line(client.post("/v1/adapters", json={"name": "x", "path": path}), 403)
            assert str(tree["top"]) not in detail, detail  # no absolute path in the answer
        assert "no adapter" in _one_line(
            client.post("/v1/adapters", json={"name": "x", "path": "empty"}), 422
        )
        other = client.post("/v1/adapters", json={"name": "x", "path": "otherbase"})
        assert "fit" in _one_line(other, 422)  # its shapes, from the header alone
        assert client.get("/v1/adapters").json()["adapters"][0]["path"] is None  # given at start-up

        loaded = client.post("/v1/adapters", json={"name": "g1", "path": "good1"})
        assert loaded.status_code == 201, loaded.text
        assert loaded.json()["path"] == "good1"
        via_link = client.post("/v1/adapters", json={"name": "g3", "path": "inside-link"})
        assert via_link.status_code == 201 and via_link.json()["path"] == "good3", via_link.text
        full = client.post("/v1/adapters", json={"name": "g2", "path": "good2"})
        assert "--max-adapters" in _one_line(full, 409)  # start, g1, g3: 3 loaded
        listing = client.get("/v1/adapters").json()["adapters"]
        assert [(a["name"], a["path"]) for a in listing] == [
            ("start", None),
            ("g1", "good1"),
            ("g3", "good3"),
        ]
        assert client.post("/v1/predict", json={**PREDICT, "adapter": "g1"}).status_code == 200
        assert client.delete("/v1/adapters/g3").status_code == 200
        assert client.post("/v1/adapters", json={"name": "g2", "path": "good2"}).status_code == 201
    opened = secured.opened.read_text().splitlines()  # type: ignore[attr-defined]
    assert any(str(tree["startup"]) in line for line in opened), opened  # the hook sees the server's reads
    assert not [line for line in opened if str(tree["outside"]) in line], opened
    log = secured.text()
    for line in ["adapter='g1' path='good1': loaded", "unload by=key-", "adapter='g3': unloaded"]:
        assert line in log, log
    assert "at=20" in log  # when, as an ISO date


def _raw(port: int, head: bytes, body: bytes) -> bytes:
    """Send ``head`` and the start of a body, then read the answer (the body's rest is never sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_an_oversized_body_is_answered_413_before_it_is_sent(secured: Server) -> None:
    auth = f"Authorization: Bearer {API_KEY}\r\n".encode()
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
    declared = _raw(secured.port, head + b"Content-Length: 50000000\r\n\r\n", b'{"adapter": "start"')
    assert declared.startswith(b"HTTP/1.1 413"), declared
    chunk = b"x" * 16384
    streamed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6))  # 96 KiB, no last chunk
    chunked = _raw(secured.port, head + b"Transfer-Encoding: chunked\r\n\r\n", streamed)
    assert chunked.startswith(b"HTTP/1.1 413"), chunked
    with _client(secured, API_KEY) as client:
        too_many = {"adapter": "start", "inputs": [{"text": "x"}] * 9}
        assert "--max-inputs" in _one_line(client.post("/v1/predict", json=too_many), 413)
        too_long = {"adapter": "start", "inputs": [{"text": "x" * 1001}]}
        assert "--max-input-chars" in _one_line(client.post("/v1/predict", json=too_long), 422)
        assert client.post("/v1/predict", json=PREDICT).status_code == 200  # still serving


def test_metrics_count_the_requests_sent(secured: Server) -> None:
    before = metrics(secured.url)
    with _client(secured, API_KEY) as client:
        for _ in range(3):
            assert client.post("/v1/predict", json=PREDICT).status_code == 200
        _one_line(client.post("/v1/predict", json={**PREDICT, "adapter": "nope"}), 404)
        _one_line(
            client.post("/v1/predict", json={"adapter": "start", "inputs": [{"text": "y" * 2000}]}), 422
        )
        _one_line(client.post("/v1/predict", content=b"{" * 70000), 413)
        _one_line(client.post("/v1/predict", json={"adapter": "start"}), 422)
        loaded = len(client.get("/v1/adapters").json()["adapters"])
    _one_line(httpx.get(secured.url + "/v1/adapters"), 401)
    after = metrics(secured.url)
    route = "/v1/predict"
    assert delta(after, before, "lorakit_request_seconds_count", route=route, status="200") == 3
    for status, count in [("404", 1), ("422", 2), ("413", 1)]:
        assert delta(after, before, "lorakit_request_seconds_count", route=route, status=status) == count
    assert delta(after, before, "lorakit_request_seconds_count", route="/v1/adapters", status="401") == 1
    assert delta(after, before, "lorakit_rows_total", adapter="start") == 6
    assert delta(after, before, "lorakit_batch_rows_sum") == 6
    assert delta(after, before, "lorakit_batch_rows_count") >= 1
    for reason, count in [
        ("unknown_adapter", 1), ("input_too_long", 1), ("body_too_large", 1), ("invalid", 1),
        ("unauthorized", 1), ("queue_full", 0), ("timeout", 0),
    ]:  # fmt: skip
        assert delta(after, before, "lorakit_rejected_requests_total", reason=reason) == count, reason
    assert after[("lorakit_adapters_loaded", ())] == loaded
    assert after[("lorakit_queue_rows", ())] == 0


@pytest.fixture(scope="module")
def busy(tree: dict) -> Server:
    """No keys (loopback), public metrics; a 1-row request waits 5 s for company but times out at 1.5 s;
    4 rows fill a batch; the queue holds 4 rows."""
    args = ["--adapter", f"start={tree['startup'] / 'start'}", "--base", str(tree["base"])]
    args += ["--max-batch-size", "4", "--max-wait-ms", "5000", "--request-timeout-s", "1.5"]
    args += ["--max-queue-rows", "4", "--max-inputs", "4", "--public-metrics"]
    server = Server(args, tree["top"] / "busy.log")
    yield server
    server.stop()


def test_a_full_queue_answers_429_at_once_and_a_request_queued_too_long_503(busy: Server) -> None:
    one = {"adapter": "start", "inputs": [{"text": "alone"}]}
    four = {"adapter": "start", "inputs": [{"text": f"row {i}"} for i in range(4)]}
    before = metrics(busy.url, None)

    async def scenario() -> tuple:
        async with httpx.AsyncClient(base_url=busy.url, timeout=60) as client:
            waiting = asyncio.create_task(client.post("/v1/predict", json=one))
            await asyncio.sleep(0.5)  # queued: 1 row, waiting for company
            full = await client.post("/v1/predict", json=four)  # 1 + 4 rows > 4
            health = await client.get("/health")
            listing = await client.get("/v1/adapters")
            timed_out = await waiting
            after = await client.post("/v1/predict", json=four)  # a full batch: runs at once
            return full, health, listing, timed_out, after

    full, health, listing, timed_out, after = asyncio.run(scenario())
    assert "--max-queue-rows" in _one_line(full, 429)
    assert int(full.headers["retry-after"]) >= 1
    assert health.status_code == 200 and listing.status_code == 200
    assert "--request-timeout-s" in _one_line(timed_out, 503)
    assert after.status_code == 200 and len(after.json()["outputs"]) == 4, after.text
    now = metrics(busy.url, None)
    assert delta(now, before, "lorakit_rejected_requests_total", reason="queue_full") == 1
    assert delta(now, before, "lorakit_rejected_requests_total", reason="timeout") == 1
    assert delta(now, before, "lorakit_rows_total", adapter="start") == 4  # the dropped row never ran
    assert now[("lorakit_queue_rows", ())] == 0


def test_a_500_names_a_request_id_and_the_log_has_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """In process, with a predictor that fails with a path in its message."""
    from fastapi.testclient import TestClient

    from lorakit.predict import AdapterSource
    from lorakit.serve.app import Service, create_app
    from lorakit.serve.batcher import Batcher

    class Failing:
        base = "base"
        sources = {
            "a": AdapterSource("a", Path("/srv/a"), "base", "classification", 2, None, None, 8, None, "")
        }
        info = {"a": {"name": "a", "path": "/srv/a"}}

        def predict(self, rows: list, batch_size: int = 64) -> list:
            raise RuntimeError("cannot read /srv/secret/weights.bin")

    predictor = Failing()
    service = Service(predictor, Batcher(predictor))  # type: ignore[arg-type]
    with TestClient(create_app(service)) as client:
        response = client.post("/v1/predict", json={"adapter": "a", "inputs": [{"text": "x"}]})
    assert response.status_code == 500
    detail = response.json()["detail"]
    request_id = response.headers["x-request-id"]
    assert detail == f"internal error (request id {request_id})"
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert f"request id {request_id}" in logged and "/srv/secret/weights.bin" in logged


@pytest.mark.parametrize(
    "args, where",
    [
        (["--host", "0.0.0.0"], "--host"),
        (["--host", "0.0.0.0", "--api-key", "short"], "--api-key"),
        (["--max-queue-rows", "8", "--max-inputs", "16"], "--max-queue-rows"),
        (["--adapter-root", "/nonexistent/root"], "--adapter-root"),
        (["--max-body-bytes", "0"], "--max-body-bytes"),
    ],
)
def test_unsafe_or_bad_exposure_options_are_one_line_and_exit_2(
    args: list[str],
    where: str,
    tree: dict,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LORAKIT_API_KEY", raising=False)
    monkeypatch.delenv("LORAKIT_ADMIN_KEY", raising=False)
    assert main(["serve", "--adapter", f"s={tree['startup'] / 'start'}", *args]) == 2
    err = capsys.readouterr().err
    assert where in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_full_queue_is_answered_429_before_the_body_is_parsed() -> None:
    """The queue's gate, in process: with no room for one row, ``POST /v1/predict`` is 429 without the
    route (the body is not even JSON here), its body read and dropped so that the connection stays open;
    a body over the limit is not read at all and the connection closes; with room, or on another route,
    the request goes on to the app."""
    from lorakit.serve.limits import QueueGate
    from lorakit.serve.metrics import Metrics

    reached: list[str] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        reached.append(scope["path"])

    queued = {"rows": 4}
    counters = Metrics()
    gate = QueueGate(app, lambda: queued["rows"], 4, 100, counters)

    def call(path: str, chunks: list[bytes], method: str = "POST", declared: int | None = None) -> tuple:
        messages = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]
        size = sum(map(len, chunks)) if declared is None else declared
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "headers": [(b"content-length", b"%d" % size)],
        }
        sent: list[dict] = []

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        asyncio.run(gate(scope, receive, send))
        return sent, messages

    sent, left = call("/v1/predict", [b"not json {", b" at all"])
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 429 and int(headers[b"retry-after"]) >= 1 and b"connection" not in headers
    assert b"--max-queue-rows" in sent[1]["body"] and left == [] and reached == []
    sent, left = call("/v1/predict", [b"x" * 50], declared=500)  # over --max-body-bytes: not read
    assert sent[0]["status"] == 429 and dict(sent[0]["headers"])[b"connection"] == b"close" and len(left) == 1
    samples = {
        s.name: s.value
        for f in counters.registry.collect()
        for s in f.samples
        if s.labels == {"reason": "queue_full"}
    }
    assert samples["lorakit_rejected_requests_total"] == 2
    call("/v1/adapters", [b"{}"])  # another route: not the gate's
    queued["rows"] = 3  # room for a row: the route decides
    call("/v1/predict", [b"{}"])
    assert reached == ["/v1/adapters", "/v1/predict"]
