"""The OpenAI-compatible routes of ``lorakit serve`` for real: the CLI in its own process on 127.0.0.1,
three generation adapters (PEFT, random A and B) on a tiny GPT-2 and on a tiny Llama with a chat template
(``test_serve_openai_decoding`` builds them). Concurrent requests for every adapter and the bare base
decode in shared steps and each greedy text equals ``lorakit generate`` with that adapter alone; streamed
pieces join to the text sent whole; stop strings, finish reasons and usage; the official ``openai``
client; errors in OpenAI's shape (with a key, as a server exposed runs); the queue gate's 429; metrics.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
from test_serve_openai_decoding import ADAPTERS, PROMPTS, shared_runs
from test_serve_security import API_KEY, Server, metrics

AUTH = {"Authorization": f"Bearer {API_KEY}"}
NEW = 12  # max_tokens of the equality checks


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, dict[str, Path]]:
    return shared_runs(tmp_path_factory, shared_data)


def _start(family_dirs: dict[str, Path], log: Path, *extra: str) -> Server:
    args = [a for n in ADAPTERS for a in ("--adapter", f"{n}={family_dirs[n]}")]
    return Server([*args, "--api-key", API_KEY, "--max-new-tokens", "32", *extra], log)


@pytest.fixture(scope="module")
def gpt2(runs: dict, tmp_path_factory: pytest.TempPathFactory) -> Server:
    server = _start(runs["gpt2"], tmp_path_factory.mktemp("gpt2-log") / "serve.log")
    yield server
    assert server.stop() == 0
    assert "Traceback" not in server.text(), server.text()[-3000:]


@pytest.fixture(scope="module")
def llama(runs: dict, tmp_path_factory: pytest.TempPathFactory) -> Server:
    server = _start(runs["llama"], tmp_path_factory.mktemp("llama-log") / "serve.log")
    yield server
    assert server.stop() == 0
    assert "Traceback" not in server.text(), server.text()[-3000:]


async def _complete_all(url: str, bodies: list[dict]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as client:
        answers = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    for answer in answers:
        assert answer.status_code == 200, answer.text
    return [a.json() for a in answers]


def _base_alone(base: Path, prompts: list[str]) -> list[str]:
    """The bare base model's greedy continuation of each prompt alone through ``generate``, decoded as
    ``lorakit generate`` decodes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    texts = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=NEW,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return texts


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_concurrent_mixed_requests_equal_lorakit_generate_with_each_adapter_alone(
    family: str, runs: dict, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from lorakit.generate import generate

    server: Server = request.getfixturevalue(family)
    dirs = runs[family]
    base = str(dirs["base"])
    prompts = PROMPTS[:3]  # lengths 1 to 20 tokens: left padding in the shared steps
    jobs = [(m, p) for m in (*ADAPTERS, base) for p in prompts]
    before = metrics(server.url)
    answers = asyncio.run(
        _complete_all(
            server.url, [{"model": m, "prompt": p, "max_tokens": NEW, "temperature": 0} for m, p in jobs]
        )
    )
    after = metrics(server.url)
    # lorakit generate with one adapter, its inputs a file of the prompts (left-padded in one batch).
    inputs = tmp_path / "prompts.txt"
    inputs.write_text("\n".join(prompts) + "\n")
    expected = {
        m: generate(dirs[m], str(inputs), task="none", greedy=True, max_new_tokens=NEW) for m in ADAPTERS
    }
    expected[base] = _base_alone(dirs["base"], prompts)
    seen: dict[str, set[str]] = {}
    for (model, prompt), answer in zip(jobs, answers, strict=True):
        choice = answer["choices"][0]
        assert answer["object"] == "text_completion" and answer["model"] == model
        assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == NEW
        assert answer["usage"]["total_tokens"] == answer["usage"]["prompt_tokens"] + NEW
        text = " ".join(choice["text"].splitlines()).strip()
        assert text == expected[model][prompts.index(prompt)], (model, prompt)
        seen.setdefault(prompt, set()).add(text)
    assert all(len(texts) == 4 for texts in seen.values()), seen  # each adapter generates its own text
    steps = after[("lorakit_decode_step_rows_count", ())] - before.get(
        ("lorakit_decode_step_rows_count", ()), 0
    )
    single = after[("lorakit_decode_step_rows_bucket", (("le", "1.0"),))] - before.get(
        ("lorakit_decode_step_rows_bucket", (("le", "1.0"),)), 0
    )
    assert steps > single, (steps, single)  # some steps decoded rows of several requests together
    tokens = sum(after.get(("lorakit_generated_tokens_total", (("model", m),)), 0) for m in ADAPTERS)
    assert (
        tokens - sum(before.get(("lorakit_generated_tokens_total", (("model", m),)), 0) for m in ADAPTERS)
        == 9 * NEW
    )
    assert after[("lorakit_time_to_first_token_seconds_count", ())] >= len(jobs)
    assert after[("lorakit_inter_token_latency_seconds_count", ())] >= len(jobs) * (NEW - 1)


def _sse(response: httpx.Response) -> list[dict | str]:
    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return events


def test_streamed_pieces_join_to_the_whole_text_and_stop_strings_end_it(gpt2: Server) -> None:
    body = {"model": "a2", "prompt": [PROMPTS[0], PROMPTS[2]], "max_tokens": 20, "temperature": 0}
    with httpx.Client(base_url=gpt2.url, headers=AUTH, timeout=60) as client:
        whole = client.post("/v1/completions", json=body).json()
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/completions", json=stream) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith(
                "text/event-stream"
            )
            events = _sse(response)
        assert events[-1] == "[DONE]"
        usage = events[-2]
        assert usage["choices"] == [] and usage["usage"] == whole["usage"]
        chunks = events[:-2]
        assert len(chunks) > 4  # piece by piece, not one chunk per choice
        for i, choice in enumerate(whole["choices"]):
            mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
            assert "".join(c["text"] for c in mine) == choice["text"]
            assert [c["finish_reason"] for c in mine][-1] == "length"
            assert all(c["finish_reason"] is None for c in mine[:-1])
        # A stop string from the middle of the first text: the text ends just before it.
        text = whole["choices"][0]["text"]
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        stopped = client.post(
            "/v1/completions", json={**body, "prompt": PROMPTS[0], "stop": [stop, "zzz"]}
        ).json()
        assert stopped["choices"][0]["text"] == text[: text.index(stop)]
        assert stopped["choices"][0]["finish_reason"] == "stop"
        assert stopped["usage"]["completion_tokens"] < 20
        with client.stream(
            "POST", "/v1/completions", json={**stream, "prompt": PROMPTS[0], "stop": stop}
        ) as response:
            pieces = [e for e in _sse(response) if isinstance(e, dict) and e["choices"]]
        assert "".join(p["choices"][0]["text"] for p in pieces) == text[: text.index(stop)]
        assert pieces[-1]["choices"][0]["finish_reason"] == "stop"


def test_the_openai_client_works_unchanged_and_errors_come_in_its_shape(gpt2: Server, runs: dict) -> None:
    client = openai.OpenAI(base_url=gpt2.url + "/v1", api_key=API_KEY, max_retries=0)
    base = str(runs["gpt2"]["base"])
    assert [m.id for m in client.models.list()] == [base, *ADAPTERS]
    done = client.completions.create(model="a3", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 8
    pieces = client.completions.create(
        model="a3", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == done.choices[0].text
    sampled = [
        client.completions.create(model="a1", prompt="Hi", max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
        for _ in range(2)
    ]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text  # one seed, one text

    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="Hi", max_tokens=4)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as over:
        client.completions.create(model="a1", prompt="Hi", max_tokens=33)
    assert over.value.body["param"] == "max_tokens" and "--max-new-tokens" in over.value.body["message"]
    with pytest.raises(openai.BadRequestError) as many:
        client.completions.create(model="a1", prompt="Hi", n=2)
    assert many.value.body["param"] == "n" and many.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as no_template:  # GPT-2's tokenizer has none
        client.chat.completions.create(model="a1", messages=[{"role": "user", "content": "Hi"}])
    assert "chat template" in no_template.value.body["message"]
    long_prompt = "word " * 200  # about 200 tokens: over the 128 positions
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="a1", prompt=long_prompt, max_tokens=4)
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        openai.OpenAI(base_url=gpt2.url + "/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()
    assert set(unauthorized.value.body) == {"message", "type", "param", "code"}
    assert unauthorized.value.body["type"] == "authentication_error"
    # Other routes keep their own error shape.
    predict = httpx.post(
        gpt2.url + "/v1/predict", json={"adapter": "nope", "inputs": [{"text": "x"}]}, headers=AUTH
    )
    assert predict.status_code == 404 and set(predict.json()) == {"detail"}


def test_chat_renders_the_template_and_streams_with_the_client(llama: Server, runs: dict) -> None:
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=llama.url + "/v1", api_key=API_KEY, max_retries=0)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is The Eagle?"},
    ]
    chat = client.chat.completions.create(model="a2", messages=messages, max_tokens=10, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 10
    # The same as completing the prompt the template renders.
    tokenizer = AutoTokenizer.from_pretrained(runs["llama"]["base"])
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>")
    done = client.completions.create(model="a2", prompt=rendered, max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == done.choices[0].text
    assert chat.usage.prompt_tokens == done.usage.prompt_tokens
    stream = client.chat.completions.create(
        model="a2", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # a3's directory holds its own template: it renders a3's prompts, the tokenizer's the others'.
    own = client.chat.completions.create(model="a3", messages=messages, max_tokens=6, temperature=0)
    rendered = "[system] Be brief. [user] Where is The Eagle? [assistant]"
    plain = client.completions.create(model="a3", prompt=rendered, max_tokens=6, temperature=0)
    assert own.choices[0].message.content == plain.choices[0].text
    assert own.usage.prompt_tokens == plain.usage.prompt_tokens


def test_a_full_generation_queue_is_refused_before_the_body_is_read(runs: dict) -> None:
    """In process: the decoding queue held at its bound, a completion is answered 429 by the gate, in
    OpenAI's shape, with Retry-After; and ``submit`` itself refuses past the bound."""
    from fastapi.testclient import TestClient

    from lorakit.predict import Predictor, read_sources
    from lorakit.serve.app import Service, create_app
    from lorakit.serve.batcher import Batcher, QueueFull
    from lorakit.serve.decode_queue import scheduler_for
    from lorakit.serve.options import ServeOptions

    sources = read_sources([f"a1={runs['gpt2']['a1']}"], None, None)
    predictor = Predictor(list(sources.values()))
    options = ServeOptions(max_inputs=2, max_queue_rows=2)
    batcher = Batcher(predictor)
    service = Service(predictor, batcher, options=options)
    service.generation = scheduler_for(predictor, batcher, 4, options.max_queue_rows, service.metrics)
    with TestClient(create_app(service)) as client:
        body = {"model": "a1", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200
        service.generation.queued_rows = 2  # as if two rows waited
        refused = client.post("/v1/completions", json=body)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        service.generation.queued_rows = 1
        from lorakit.serve.decoding import DecodeRow, Sampling
        from lorakit.serve.text_stream import TextStream

        row = DecodeRow("a1", [1, 2], 2, Sampling(0.0), TextStream(predictor.tokenizer))
        with pytest.raises(QueueFull):
            service.generation.submit([row, row])
        service.generation.queued_rows = 0
        assert client.post("/v1/completions", json=body).status_code == 200


def test_a_request_queued_past_the_timeout_is_dropped_with_a_503(runs: dict, monkeypatch) -> None:  # noqa: ANN001
    """In process: while the batch has no room (nothing joins), a completion waits ``--request-timeout-s``,
    then is answered 503 in OpenAI's shape and leaves the queue; once rows join again, requests are served."""
    from fastapi.testclient import TestClient

    from lorakit.predict import Predictor, read_sources
    from lorakit.serve.app import Service, create_app
    from lorakit.serve.batcher import Batcher
    from lorakit.serve.decode_queue import DecodeScheduler, scheduler_for
    from lorakit.serve.options import ServeOptions

    sources = read_sources([f"a1={runs['gpt2']['a1']}"], None, None)
    predictor = Predictor(list(sources.values()))
    options = ServeOptions(request_timeout_s=0.2)
    batcher = Batcher(predictor)
    service = Service(predictor, batcher, options=options)
    service.generation = scheduler_for(predictor, batcher, 4, options.max_queue_rows, service.metrics)
    joining = DecodeScheduler._joining
    body = {"model": "a1", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    with TestClient(create_app(service)) as client:
        monkeypatch.setattr(DecodeScheduler, "_joining", lambda self: [])  # a batch that never has room
        refused = client.post("/v1/completions", json=body)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "timeout" and "--request-timeout-s" in error["message"]
        assert service.generation.queued_rows == 0  # dropped, not left waiting
        monkeypatch.setattr(DecodeScheduler, "_joining", joining)
        answered = client.post("/v1/completions", json=body)
        assert answered.status_code == 200 and answered.json()["choices"][0]["finish_reason"] in (
            "stop",
            "length",
        )
