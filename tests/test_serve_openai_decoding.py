"""Mixed-adapter decoding (``lorakit.serve.decoding``) in process, token for token against each adapter
decoding alone through ``transformers``' own ``generate``: rows of three adapters and the bare base in
one batch, prompts of different lengths (left padding, positions from the mask), rows joining while
others decode and leaving when done; on a tiny GPT-2 (learned absolute positions) and a tiny Llama
(rotary positions, grouped-query attention). Also the text released piece by piece (``TextStream``).

The bases and adapters built here (``make_bases``, ``generation_run``) serve the HTTP tests too
(``test_serve_openai.py``): random weights, the real GPT-2 tokenizer, PEFT adapters with random B so that
each adapter changes what is generated, and a run directory (recipe.yaml, greedy decoding, no n-gram
blocking) beside each so that ``lorakit generate`` and ``lorakit serve`` read it as a lorakit run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

ADAPTERS = ("a1", "a2", "a3")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = [
    "name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate]",
    "Hello",
    "The quick brown fox jumps over the lazy dog and then",
    "name[Alimentum], area[city centre]",
    "A",
]


def make_bases(top: Path, shared_data: Path) -> dict[str, Path]:
    """A tiny GPT-2 and a tiny Llama (with a chat template), both on the real GPT-2 tokenizer. Weights
    drawn wider than the default 0.02 so that the next token's logits are not near ties."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    torch.manual_seed(0)
    gpt2 = GPT2Config(
        vocab_size=50257, n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2
    )
    GPT2LMHeadModel(gpt2).save_pretrained(top / "gpt2")
    tokenizer.save_pretrained(top / "gpt2")
    llama = LlamaConfig(
        vocab_size=50257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=50256,
        eos_token_id=50256,
        initializer_range=0.2,
    )
    LlamaForCausalLM(llama).save_pretrained(top / "llama")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(top / "llama")
    return {"gpt2": top / "gpt2", "llama": top / "llama"}


TARGETS = {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def generation_run(out: Path, base: Path, family: str, seed: int, max_new_tokens: int = 16) -> Path:
    """A run directory: a PEFT LoRA (random A and B) saved by PEFT, and a recipe decoding greedily."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[family],
        fan_in_fan_out=family == "gpt2",
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # random B too: the adapter changes outputs
    )
    peft.get_peft_model(model, config).save_pretrained(out)
    recipe = {
        "model": {"name_or_path": str(base)},
        "task": {"name": "e2e", "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "target_modules": TARGETS[family]},
        "generation": {"num_beams": 1, "max_new_tokens": max_new_tokens, "no_repeat_ngram_size": 0},
        "output_dir": str(out),
    }
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return out


OWN_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}[assistant]"


def family_runs(top: Path, shared_data: Path) -> dict[str, dict[str, Path]]:
    """For each family: its base and three adapters; the Llama's a3 carries a chat template of its own."""
    bases = make_bases(top, shared_data)
    runs = {
        family: {
            "base": base,
            **{
                n: generation_run(top / f"{family}-{n}", base, family, seed)
                for seed, n in enumerate(ADAPTERS)
            },
        }
        for family, base in bases.items()
    }
    (runs["llama"]["a3"] / "chat_template.jinja").write_text(OWN_TEMPLATE)
    return runs


_BUILT: dict[str, dict[str, dict[str, Path]]] = {}  # built once a session: the HTTP tests use them too


def shared_runs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, dict[str, Path]]:
    """``family_runs`` in a session's temporary folder, built by the first module that asks."""
    if "runs" not in _BUILT:
        _BUILT["runs"] = family_runs(tmp_path_factory.mktemp("openai-runs"), shared_data)
    return _BUILT["runs"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, dict[str, Path]]:
    return shared_runs(tmp_path_factory, shared_data)


@pytest.fixture(scope="module")
def predictors(runs: dict[str, dict[str, Path]]) -> dict:
    """Per family, a lazily built ``Predictor`` holding the three adapters."""
    from lorakit.predict import Predictor, read_sources

    built: dict = {}

    def get(family: str):  # noqa: ANN202
        if family not in built:
            specs = [f"{n}={runs[family][n]}" for n in ADAPTERS]
            built[family] = Predictor(list(read_sources(specs, None, None).values()))
        return built[family]

    return get


def _alone(predictor, adapter: str | None, prompt: list[int], max_new: int) -> list[int]:  # noqa: ANN001
    """``generate`` greedily with one adapter active (None: the bare base), one prompt, no batch."""
    from lorakit.lora import activated

    ids = torch.tensor([prompt])
    with activated(predictor.model, adapter), torch.no_grad():
        out = predictor.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new,
            eos_token_id=predictor.tokenizer.eos_token_id,
            pad_token_id=predictor.tokenizer.pad_token_id,
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mixed_rows_joining_mid_decode_match_each_adapter_alone(predictors, family: str) -> None:  # noqa: ANN001
    from lorakit.serve.decoding import DecodeEngine, DecodeRow, Sampling
    from lorakit.serve.text_stream import TextStream

    predictor = predictors(family)
    tok = predictor.tokenizer
    engine = DecodeEngine(predictor.model, tok.eos_token_id, tok.pad_token_id)
    names: list[str | None] = [*ADAPTERS, None]
    rows = []
    for i, text in enumerate(PROMPTS * 2):  # 10 rows, every adapter twice at least, lengths 1 to 20
        ids = tok(text, add_special_tokens=False)["input_ids"]
        rows.append(DecodeRow(names[i % 4], ids, 6 + (i % 5) * 2, Sampling(0.0), TextStream(tok)))
    # Four rows start; the others join two at a time at later steps, while the first ones go on.
    waves = [rows[:4], [], rows[4:6], rows[6:8], [], rows[8:]]
    steps, sizes = 0, []
    while steps < len(waves) or engine.rows:
        engine.step(waves[steps] if steps < len(waves) else [])
        sizes.append(len(engine.rows))
        steps += 1
    assert max(sizes) >= 6, sizes  # rows of several adapters did share the batch
    distinct = set()
    for row in rows:
        expected = _alone(predictor, row.adapter, row.prompt, row.max_tokens)
        assert row.tokens == expected, (row.adapter, row.prompt)
        assert row.finish == "length" and len(row.tokens) == row.max_tokens
        assert row.text.text == tok.decode(row.tokens, skip_special_tokens=True)
        distinct.add(tuple(row.tokens[:4]) + (row.prompt[0],))
    # The adapters do differ: the same prompt through each gives other tokens.
    same_prompt = [r.tokens[:6] for r in rows if r.prompt == rows[0].prompt]
    assert len({tuple(t) for t in same_prompt}) == len(same_prompt), same_prompt


def test_sampling_is_reproducible_with_a_seed_and_top_p_narrows_it(predictors) -> None:  # noqa: ANN001
    from lorakit.serve.decoding import DecodeEngine, DecodeRow, Sampling
    from lorakit.serve.text_stream import TextStream

    predictor = predictors("gpt2")
    tok = predictor.tokenizer
    engine = DecodeEngine(predictor.model, tok.eos_token_id, tok.pad_token_id)
    prompt = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]

    def run(sampling: Sampling) -> list[int]:
        row = DecodeRow("a1", prompt, 8, sampling, TextStream(tok))
        engine.step([row])
        while engine.rows:
            engine.step([])
        return row.tokens

    assert run(Sampling(1.0, 1.0, seed=5)) == run(Sampling(1.0, 1.0, seed=5))
    assert run(Sampling(1.0, 1.0, seed=5)) != run(Sampling(1.0, 1.0, seed=6))
    # A nucleus so small that only the most likely token is left: greedy.
    assert run(Sampling(1.0, 1e-9, seed=5)) == run(Sampling(0.0))


class _Chars:
    """A tokenizer whose ids are characters' code points (a stand-in for the decode method alone)."""

    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_what_may_change_and_cuts_at_stop_strings() -> None:
    from lorakit.serve.text_stream import TextStream

    stream = TextStream(_Chars(), stops=["END", "\n\n"])
    pieces = [stream.add(ord(c)) for c in "abc EN"]
    assert "".join(pieces) == "abc " and pieces[-1] == ""  # "EN" may start "END": held back
    assert stream.add(ord("X")) == "ENX"  # it did not
    assert stream.add(ord("E")) == "" and stream.add(ord("N")) == "" and stream.add(ord("D")) == ""
    assert stream.stopped and stream.text == "abc ENX" and stream.add(ord("z")) == ""
    unfinished = TextStream(_Chars())
    assert unfinished.add(ord("a")) + unfinished.add(0xFFFD) == "a"  # half a character: held
    assert unfinished.finish() == "\ufffd" and unfinished.text == "a\ufffd"


def test_a_temperature_near_zero_samples_the_most_likely_token() -> None:
    """Found by the fuzz test: 1e-300 is a valid temperature, and dividing the raw logits by it gave inf
    and a nan softmax; it must draw the argmax, as greedy decoding would."""
    import torch

    from lorakit.serve.decoding import Sampling, _sample

    logits = torch.tensor([1.5, 3.25, -2.0, 3.0])
    for temperature in (1e-300, 5e-324, 1e-8):
        for top_p in (1.0, 0.5):
            drawn = _sample(logits, Sampling(temperature, top_p), torch.Generator().manual_seed(0))
            assert drawn == 1, (temperature, top_p)
