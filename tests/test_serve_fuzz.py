"""Schemathesis against the live ``lorakit serve`` (keys, an admin key and an adapter root, so that every
route is reachable): requests generated from the server's own OpenAPI schema, a bounded number per
route. Checks: no 5xx, every status, content type, header and body as the schema documents them, and a
route that declares the bearer scheme refuses the request without its key (``ignored_auth``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from conftest import peft_three_label_adapter
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
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
