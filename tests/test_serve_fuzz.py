"""Schemathesis against the live ``lorakit serve`` (keys, an admin key and an adapter root, so that every
route is reachable): requests generated from the server's own OpenAPI schema, a bounded number per
route. Checks: no 5xx, every status, content type, header and body as the schema documents them, and a
route that declares the bearer scheme refuses the request without its key (``ignored_auth``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from conftest import peft_three_label_adapter
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from test_serve_openai_decoding import ADAPTERS, shared_runs
from test_serve_security import ADMIN_KEY, API_KEY, Server

EXAMPLES = 15  # per route and method: 6 operations, about 90 cases, under a minute on 2 cores
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.ignored_auth,
]
CASES: list[str] = []


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path) -> Server:
    top = tmp_path_factory.mktemp("serve-fuzz")
    peft_three_label_adapter(top / "start", tiny_roberta_dir)
    peft_three_label_adapter(top / "root" / "good", tiny_roberta_dir)
    args = ["--adapter", f"start={top / 'start'}", "--base", str(tiny_roberta_dir)]
    args += ["--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--adapter-root", str(top / "root")]
    args += ["--max-inputs", "8", "--max-input-chars", "300", "--max-adapters", "4"]
    server = Server(args, top / "fuzz.log")
    yield server
    server.stop()


def test_every_route_answers_as_its_schema_says(fuzzed: Server) -> None:
    """Each operation of the schema in turn, ``EXAMPLES`` generated cases each (deterministic)."""
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json", headers=auth)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 6, [op.label for op in operations]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
        )
        def run(case: schemathesis.Case) -> None:
            CASES.append(f"{case.method} {case.path}")
            case.call_and_validate(base_url=fuzzed.url, headers=auth, checks=CHECKS, timeout=60)

        run()
    print(f"schemathesis: {len(CASES)} cases over {len(set(CASES))} operations")
    expected = {"GET /health", "GET /metrics", "POST /v1/predict", "GET /v1/adapters", "POST /v1/adapters"}
    assert expected | {"DELETE /v1/adapters/{name}"} <= set(CASES), set(CASES)
    assert "Traceback" not in fuzzed.text(), fuzzed.text()[-3000:]


OPENAI_CASES: list[str] = []


@pytest.fixture(scope="module")
def generating(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Server:
    """A server of three generation adapters on a tiny GPT-2 (the OpenAI routes' tests' runs)."""

    runs = shared_runs(tmp_path_factory, shared_data)["gpt2"]
    args = [a for n in ADAPTERS for a in ("--adapter", f"{n}={runs[n]}")]
    args += ["--api-key", API_KEY, "--max-new-tokens", "16", "--max-input-chars", "300"]
    server = Server(args, tmp_path_factory.mktemp("serve-fuzz-openai") / "fuzz.log")
    yield server
    server.stop()


def test_the_openai_routes_answer_as_their_schema_says(generating: Server) -> None:
    """The OpenAI-compatible operations of a generation server, fuzzed as above: no 5xx, every answer as
    documented (errors in OpenAI's shape), and none without the key."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    schema = schemathesis.openapi.from_url(generating.url + "/openapi.json", headers=auth)
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [
        op for op in operations if op.path in ("/v1/completions", "/v1/chat/completions", "/v1/models")
    ]
    assert len(operations) == 3, [op.label for op in operations]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
        )
        def run(case: schemathesis.Case) -> None:
            # Generated names are almost never a loaded model: two cases in three name an adapter, so that
            # the bodies reach the tokenizer and the decoder, not only the 404.
            if isinstance(case.body, dict) and "model" in case.body and len(OPENAI_CASES) % 3:
                case.body["model"] = ADAPTERS[len(OPENAI_CASES) % len(ADAPTERS)]
            response = case.call(base_url=generating.url, headers=auth, timeout=60)
            OPENAI_CASES.append(f"{case.method} {case.path} {response.status_code}")
            case.validate_response(response, checks=CHECKS)

        run()
    print(f"schemathesis: {len(OPENAI_CASES)} cases: {Counter(OPENAI_CASES)}")
    routes = {case.rsplit(" ", 1)[0] for case in OPENAI_CASES}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models"} <= routes
    assert "Traceback" not in generating.text(), generating.text()[-3000:]
