"""``--max-new-tokens`` of ``lorakit serve``: the cap on what a generation adapter may decode.

The API has no per-request number of new tokens (a request naming one is refused, 422, as any unknown
field): each generation adapter decodes what its recipe's ``generation.max_new_tokens`` says, so the cap
applies per adapter: at start (exit 2, one line) and at runtime loading (422); within the cap it serves.
Adapters: PEFT LoRA on a tiny GPT-2 (random weights, the real GPT-2 tokenizer) with a recipe beside each,
written here: no training, so the module stays quick.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
import yaml
from test_serve_security import Server

from lorakit.cli import main


def _gpt2(out: Path, shared_data: Path) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2").save_pretrained(out)
    return out


def _generation_run(out: Path, base: Path, max_new_tokens: int) -> Path:
    """A run directory: a PEFT LoRA (CAUSAL_LM) saved by PEFT, and an E2E recipe decoding greedily up to
    ``max_new_tokens`` tokens."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    peft.get_peft_model(model, config).save_pretrained(out)
    recipe = {
        "model": {"name_or_path": str(base)},
        "task": {"name": "e2e", "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]},
        "generation": {"num_beams": 1, "max_new_tokens": max_new_tokens},
        "output_dir": str(out),
    }
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    top = tmp_path_factory.mktemp("serve-generation")
    base = _gpt2(top / "gpt2", shared_data)
    root = top / "root"
    root.mkdir()
    return {
        "top": top,
        "root": root,
        "short": _generation_run(top / "short", base, 6),
        "long": _generation_run(root / "long", base, 16),
        "short2": _generation_run(root / "short2", base, 8),
    }


def test_an_adapter_decoding_past_the_cap_is_refused_at_start_with_one_line(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "--adapter", f"long={runs['root'] / 'long'}", "--max-new-tokens", "8"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "16 new tokens" in lines[0] and "--max-new-tokens 8" in lines[0], err


def test_within_the_cap_it_serves_and_a_runtime_load_past_it_is_422(runs: dict[str, Path]) -> None:
    args = [
        "--adapter",
        f"short={runs['short']}",
        "--max-new-tokens",
        "8",
        "--adapter-root",
        str(runs["root"]),
    ]
    server = Server(args, runs["top"] / "serve.log")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            mr = "name[The Eagle], eatType[coffee shop], food[French]"
            served = client.post("/v1/predict", json={"adapter": "short", "inputs": [{"text": mr}]})
            assert served.status_code == 200, served.text
            assert isinstance(served.json()["outputs"][0]["prediction"], str)
            # No per-request number of tokens: the field is refused like any unknown one.
            asked = {"adapter": "short", "inputs": [{"text": mr}], "max_new_tokens": 1000}
            assert client.post("/v1/predict", json=asked).status_code == 422
            schema = client.get("/openapi.json").json()["components"]["schemas"]["PredictRequest"]
            assert "max_new_tokens" not in schema["properties"]

            refused = client.post("/v1/adapters", json={"name": "long", "path": "long"})
            assert refused.status_code == 422, refused.text
            detail = refused.json()["detail"]
            assert "16 new tokens" in detail and "--max-new-tokens 8" in detail and "\n" not in detail
            assert "long" not in [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]

            loaded = client.post("/v1/adapters", json={"name": "short2", "path": "short2"})
            assert loaded.status_code == 201, loaded.text
            again = client.post("/v1/predict", json={"adapter": "short2", "inputs": [{"text": mr}]})
            assert again.status_code == 200, again.text
    finally:
        assert server.stop() == 0
