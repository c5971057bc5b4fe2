"""The user's own generation data (``task.type: generation``) end to end, on real E2E rows written as JSONL.

A tiny GPT-2 (random weights, the real GPT-2 tokenizer, dropout off) trains a few LoRA steps. What lorakit
reports is then recomputed here without lorakit: the adapter loaded by PEFT itself, each row tokenized by
hand (prompt ids + completion ids + eos, the loss on completion and eos, cut at ``max_length`` keeping the
start). The training rows, the truncation counts, the chat loss mask, the held-out validation split and
the one-line refusals of bad rows are checked against the same hand-made encodings.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from lorakit.cli import main

MAX_LENGTH = 64
STEPS = 4
CHAT_MAX_LENGTH = 128
SYSTEM = "Describe the restaurant."
# ChatML, appending each turn, so the rendering of a conversation grows by prefixes.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # A width-32 model gains nothing from a second thread, and threads wait on each other on a busy
    # machine (test_generation.py measured 1.1 s a step with two, 0.13 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fresh_state() -> None:
    """Accelerate keeps singleton state between runs in one process; each run must start clean."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def _save_tiny_gpt2(out: Path, shared_data: Path, chat: bool = False, positions: int = 128) -> Path:
    """A tiny GPT-2 (full 50257 vocabulary, width 32, 2 layers, no dropout) and the real tokenizer in
    ``out``; ``chat`` adds ChatML's two special tokens and template (saved, so runs load it from disk)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50257,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    tokenizer = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    if chat:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = CHATML
        model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return _save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), shared_data)


def _gpt2_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def tokenizer(gpt2_dir: Path) -> Any:
    """The plain tokenizer, loaded by transformers alone (no pad token set: lorakit sets pad = eos)."""
    return _gpt2_tokenizer(gpt2_dir)


def _e2e(shared_data: Path, name: str, picks: range) -> list[dict[str, str]]:
    """Rows ``picks`` of a real E2E CSV, as ``{mr, ref}``."""
    with open(shared_data / "e2e" / name, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{"mr": rows[i]["mr"], "ref": rows[i]["ref"]} for i in picks]


def _pairs(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"prompt": r["mr"] + " ||", "completion": " " + r["ref"]} for r in rows]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_recipe(path: Path, model_dir: Path, task: dict, out: Path, **train: Any) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "task": {"type": "generation", "max_length": MAX_LENGTH, **task},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "max_steps": STEPS,
            "eval_every": STEPS,  # one evaluation, at the last step: best == final
            "batch_size": 8,
            "eval_batch_size": 5,  # 16 rows: a short last batch, and rows padded beside longer ones
            "lr": 5e-3,
            "warmup_steps": 0,
            "scheduler": "constant",
            "log_every": STEPS,
            **train,
        },
        "generation": {"num_beams": 1, "max_new_tokens": 8, "no_repeat_ngram_size": 0},
        "output_dir": str(out),
    }
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _encode(tokenizer: Any, prompt: str, completion: str, max_length: int) -> tuple[list, list, bool]:
    """Ids and labels of one row as the issue specifies them, and whether the row was cut."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids, labels = p + c, [-100] * len(p) + c
    return ids[:max_length], labels[:max_length], len(ids) > max_length


def _peft_model(base_dir: Path, run: Path | None) -> Any:
    """The base model with the run's adapter, loaded by PEFT (``run`` None: the bare base)."""
    import peft
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(base_dir)
    if run is not None:
        model = peft.PeftModel.from_pretrained(model, run)
    return model.eval()


@torch.no_grad()
def _loss(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Summed next-token cross-entropy over every label token of ``rows`` / the number of those tokens.
    One row a forward pass: no padding, so nothing here depends on how lorakit batches."""
    total, count = 0.0, 0
    for row in rows:
        ids, labels, _ = _encode(tokenizer, row["prompt"], row["completion"], MAX_LENGTH)
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        target = torch.tensor(labels[1:])
        total += float(F.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    return total / count


@pytest.fixture(scope="module")
def completion_run(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path, shared_data: Path) -> dict:
    """One run on prompt/completion JSONL: 48 train rows, 16 validation rows, 8 test rows (validation and
    test strided over their files for varied MRs, several longer than ``MAX_LENGTH``)."""
    root = tmp_path_factory.mktemp("own-gen")
    data = {
        "train": _pairs(_e2e(shared_data, "trainset.csv", range(48))),
        "validation": _pairs(_e2e(shared_data, "devset.csv", range(0, 16 * 292, 292))),
        "test": _pairs(_e2e(shared_data, "testset_w_refs.csv", range(0, 8 * 586, 586))),
    }
    files = {split: _write_jsonl(root / f"{split}.jsonl", rows) for split, rows in data.items()}
    run = root / "run"
    task = {"train_file": str(files["train"]), "validation_file": str(files["validation"])}
    recipe = _write_recipe(root / "gen.yaml", gpt2_dir, {**task, "test_file": str(files["test"])}, run)
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    loaders_log = logging.getLogger("lorakit.data.loaders")
    loaders_log.addHandler(handler)
    # Module scope runs before conftest's per-test reset, so the fixture resets and isolates itself.
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LORAKIT_HOME", str(root / "home"))
            _fresh_state()
            assert main(["train", str(recipe)]) == 0
    finally:
        loaders_log.removeHandler(handler)
    metrics = json.loads((run / "metrics.json").read_text())
    return {"run": run, "recipe": recipe, "data": data, "files": files, "metrics": metrics, "log": warnings}


def test_reported_loss_matches_peft(completion_run: dict, gpt2_dir: Path, tokenizer: Any) -> None:
    """metrics.json's eval_loss is the token-weighted cross-entropy of completion+eos under the saved
    adapter, as PEFT loading that adapter computes it, and perplexity is its exponential."""
    from safetensors.torch import load_file

    run, metrics = completion_run["run"], completion_run["metrics"]
    evals = [h for h in metrics["history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [STEPS] and metrics["best"]["step"] == STEPS
    assert metrics["final"]["eval_loss"] == metrics["best"]["eval_loss"]
    # LoRA B starts at zero: a nonzero B proves training moved the adapter, so the parity below is not
    # that of the base model with itself.
    weights = load_file(run / "adapter_model.safetensors")
    assert any(float(w.abs().max()) > 0 for k, w in weights.items() if "lora_B" in k)

    rows = completion_run["data"]["validation"]
    adapted = _loss(_peft_model(gpt2_dir, run), tokenizer, rows)
    base = _loss(_peft_model(gpt2_dir, None), tokenizer, rows)
    reported = metrics["best"]["eval_loss"]
    assert reported == pytest.approx(adapted, rel=1e-5)
    # The adapter moves the loss by far more than the tolerance, which therefore tells the two apart.
    assert abs(base - adapted) > 10 * 1e-5 * adapted, (base, adapted)
    assert metrics["best"]["perplexity"] == pytest.approx(math.exp(reported), rel=1e-9)
    assert {"exact_match", "bleu", "rouge_l"} <= set(metrics["best"])


def test_training_rows_are_prompt_completion_eos(completion_run: dict, tokenizer: Any) -> None:
    """The rows the training loader holds are exactly the hand-made encodings, cut rows keep their
    start, and the eos label survives though GPT-2's pad is its eos."""
    from lorakit.data.loaders import train_loader
    from lorakit.models import load_tokenizer
    from lorakit.recipe import load_recipe
    from lorakit.tasks import build_task

    recipe = load_recipe(completion_run["recipe"])
    lorakit_tokenizer = load_tokenizer(recipe)
    assert lorakit_tokenizer.pad_token_id == lorakit_tokenizer.eos_token_id == tokenizer.eos_token_id
    loader = train_loader(recipe, build_task(recipe.task), lorakit_tokenizer)
    got = loader.dataset
    rows = completion_run["data"]["train"]
    assert len(got) == len(rows)
    cut = 0
    for i, row in enumerate(rows):
        ids, labels, truncated = _encode(tokenizer, row["prompt"], row["completion"], MAX_LENGTH)
        assert got[i]["input_ids"] == ids, i
        assert got[i]["labels"] == labels, i
        cut += truncated
        if not truncated:
            assert labels[-1] == tokenizer.eos_token_id and labels[-2] != -100
    assert 0 < cut < len(rows)  # both kinds of row are covered

    # Padded in a batch beside a longer row, a short row keeps its eos label; only the pads are ignored.
    lengths = [len(r) for r in got["input_ids"]]
    short, long = lengths.index(min(lengths)), lengths.index(max(lengths))
    batch = loader.collate_fn([got[short], got[long]])
    n = lengths[short]
    assert batch["labels"][0, n - 1].item() == tokenizer.eos_token_id
    assert batch["input_ids"][0, n:].eq(tokenizer.eos_token_id).all()  # pads carry the eos id...
    assert (
        batch["labels"][0, n:].eq(-100).all() and batch["attention_mask"][0, n:].eq(0).all()
    )  # ...unlearned


def test_truncated_rows_are_counted(completion_run: dict, tokenizer: Any) -> None:
    data, metrics = completion_run["data"], completion_run["metrics"]
    expected = {
        split: sum(_encode(tokenizer, r["prompt"], r["completion"], MAX_LENGTH)[2] for r in data[split])
        for split in ("train", "validation")
    }
    assert all(expected.values()), expected  # both splits have cut rows, so a zero count would fail
    assert metrics["data"]["truncated"] == expected
    assert metrics["data"]["rows"] == {"train": 48, "validation": 16}
    train_file = str(completion_run["files"]["train"])
    assert any(train_file in w and f"{expected['train']} of 48" in w for w in completion_run["log"])


@pytest.mark.parametrize("key", ["train_file", "validation_file"])
def test_prompt_longer_than_max_length_is_refused(
    key: str,
    completion_run: dict,
    gpt2_dir: Path,
    tmp_path: Path,
    tokenizer: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A row whose prompt alone fills max_length: exit 2, one line naming its file and line, no run."""
    files = completion_run["files"]
    split = "train" if key == "train_file" else "validation"
    rows = list(completion_run["data"][split])
    long_prompt = " ".join(r["prompt"] for r in rows[:3])
    assert len(tokenizer(long_prompt)["input_ids"]) > MAX_LENGTH
    rows[4] = {"prompt": long_prompt, "completion": rows[4]["completion"]}
    bad = _write_jsonl(tmp_path / f"bad-{split}.jsonl", rows)
    task = {"train_file": str(files["train"]), "validation_file": str(files["validation"]), key: str(bad)}
    out = tmp_path / "run"
    recipe = _write_recipe(tmp_path / "bad.yaml", gpt2_dir, task, out)
    code = main(["train", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{bad}:5" in err and "max_length" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (out / "metrics.json").exists() and not (out / "adapter_model.safetensors").exists()


def test_eval_on_test_split_and_generate(
    completion_run: dict, gpt2_dir: Path, tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``lorakit eval --split test`` reports the test rows' loss (as PEFT computes it), and ``lorakit
    generate --greedy`` prints one line: the adapter's greedy continuation of the prompt."""
    run = completion_run["run"]
    assert main(["eval", str(run), "--split", "test"]) == 0
    tested = json.loads((run / "eval" / "metrics-test.json").read_text())
    assert tested["split"] == "test"
    model = _peft_model(gpt2_dir, run)
    assert tested["eval_loss"] == pytest.approx(
        _loss(model, tokenizer, completion_run["data"]["test"]), rel=1e-5
    )
    assert tested["perplexity"] == pytest.approx(math.exp(tested["eval_loss"]), rel=1e-9)
    capsys.readouterr()

    _fresh_state()
    prompt = completion_run["data"]["test"][1]["prompt"]
    assert main(["generate", str(run), "--input", prompt, "--greedy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():  # greedy by hand: argmax of the next token, 8 tokens or until eos
        for _ in range(8):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    expected = " ".join(tokenizer.decode(new, skip_special_tokens=True).splitlines()).strip()
    assert lines == [expected]


def test_long_eval_prompt_leaves_room_to_generate(
    gpt2_dir: Path, shared_data: Path, tmp_path: Path, tokenizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """max_length may equal the model's positions (the preflight allows it). A validation prompt just
    under max_length then leaves no room for the generated tokens: the run must either cut the prompt to
    make room (exit 0) or refuse up front in one line (exit 2), never crash in the position embeddings
    (IndexError, exit 1) after training."""
    train = _pairs(_e2e(shared_data, "trainset.csv", range(8)))
    dev = _pairs(_e2e(shared_data, "devset.csv", range(0, 4 * 500, 500)))
    # Words of real MRs while the prompt stays under max_length (128) tokens. Generating 8 tokens feeds the
    # first 7 back, at positions len(prompt) .. len(prompt) + 6: 122 tokens or more run past 128.
    words = " ".join(r["mr"] for r in _e2e(shared_data, "devset.csv", range(0, 4000, 400))).split()
    prompt = words[0]
    for word in words[1:]:
        if len(tokenizer(f"{prompt} {word} ||")["input_ids"]) >= 128:
            break
        prompt = f"{prompt} {word}"
    dev[0]["prompt"] = prompt + " ||"
    assert 122 <= len(tokenizer(dev[0]["prompt"])["input_ids"]) < 128
    task = {
        "train_file": str(_write_jsonl(tmp_path / "train.jsonl", train)),
        "validation_file": str(_write_jsonl(tmp_path / "dev.jsonl", dev)),
        "max_length": 128,  # the tiny GPT-2's n_positions
    }
    out = tmp_path / "run"
    recipe = _write_recipe(tmp_path / "long.yaml", gpt2_dir, task, out, max_steps=1, batch_size=4)
    code = main(["train", str(recipe)])
    err = capsys.readouterr().err
    assert "IndexError" not in err and "Traceback" not in err, err
    if code == 2:
        assert "max_length" in err and len(err.strip().splitlines()) == 1, err
    else:
        assert code == 0, err
        assert math.isfinite(json.loads((out / "metrics.json").read_text())["best"]["eval_loss"])


# -- chat ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    # Room for a prompt of CHAT_MAX_LENGTH tokens and the generated ones (see test_long_eval_prompt...).
    out = tmp_path_factory.mktemp("tiny-gpt2-chatml")
    return _save_tiny_gpt2(out, shared_data, chat=True, positions=CHAT_MAX_LENGTH + 32)


def _conversations(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """One conversation per row (system, user: MR, assistant: reference); every third row goes on with a
    second exchange, on the next row's MR and reference."""
    out = []
    for i, row in enumerate(rows):
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": row["mr"]},
            {"role": "assistant", "content": row["ref"]},
        ]
        if i % 3 == 0:
            nxt = rows[(i + 1) % len(rows)]
            messages += [{"role": "user", "content": nxt["mr"]}, {"role": "assistant", "content": nxt["ref"]}]
        out.append({"messages": messages})
    return out


def test_chat_run_and_assistant_only_mask(
    chat_model_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chat run trains and reports loss, perplexity and BLEU; its training rows are the ChatML text,
    learned exactly on each assistant content and the ``<|im_end|>\\n`` closing it."""
    from transformers import AutoTokenizer

    from lorakit.data.loaders import train_loader
    from lorakit.models import load_tokenizer
    from lorakit.recipe import load_recipe
    from lorakit.tasks import build_task

    train = _conversations(_e2e(shared_data, "trainset.csv", range(100, 116)))
    dev = _conversations(_e2e(shared_data, "devset.csv", range(0, 6 * 700, 700)))
    task = {
        "train_file": str(_write_jsonl(tmp_path / "chat-train.jsonl", train)),
        "validation_file": str(_write_jsonl(tmp_path / "chat-dev.jsonl", dev)),
        "messages_column": "messages",
        "max_length": CHAT_MAX_LENGTH,
    }
    out = tmp_path / "chat-run"
    recipe_path = _write_recipe(tmp_path / "chat.yaml", chat_model_dir, task, out, max_steps=2, eval_every=2)
    code = main(["train", str(recipe_path)])
    assert code == 0, capsys.readouterr().err
    best = json.loads((out / "metrics.json").read_text())["best"]
    assert all(math.isfinite(best[k]) for k in ("eval_loss", "perplexity", "bleu")), best
    assert best["perplexity"] == pytest.approx(math.exp(best["eval_loss"]), rel=1e-9)

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    assert tokenizer.chat_template == CHATML  # the template came from disk
    recipe = load_recipe(recipe_path)
    got = train_loader(recipe, build_task(recipe.task), load_tokenizer(recipe)).dataset
    assert len(got) == len(train)
    cut = 0
    for i, conversation in enumerate(train):
        # The ChatML text written out by hand, and the character spans the model must learn.
        text, learned = "", []
        for m in conversation["messages"]:
            text += f"<|im_start|>{m['role']}\n"
            start = len(text)
            text += f"{m['content']}<|im_end|>\n"
            if m["role"] == "assistant":
                learned.append((start, len(text)))
        assert tokenizer.apply_chat_template(conversation["messages"], tokenize=False) == text
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        labels = [
            token if any(a <= s and e <= b for a, b in learned) else -100
            for token, (s, e) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        # Every token is wholly inside or outside a learned span: none straddles a boundary.
        assert all(
            any(a <= s and e <= b for a, b in learned) or all(e <= a or s >= b for a, b in learned)
            for s, e in encoded["offset_mapping"]
        )
        cut += len(ids) > CHAT_MAX_LENGTH
        assert got[i]["input_ids"] == ids[:CHAT_MAX_LENGTH], i
        assert got[i]["labels"] == labels[:CHAT_MAX_LENGTH], i
    assert 0 < cut < len(train)  # some two-exchange rows are cut, keeping their start


def test_unknown_chat_role_is_refused(
    chat_model_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _conversations(_e2e(shared_data, "trainset.csv", range(200, 206)))
    rows[2]["messages"][1]["role"] = "robot"
    bad = _write_jsonl(tmp_path / "robot.jsonl", rows)
    out = tmp_path / "run"
    task = {"train_file": str(bad), "messages_column": "messages", "max_length": CHAT_MAX_LENGTH}
    code = main(["train", str(_write_recipe(tmp_path / "robot.yaml", chat_model_dir, task, out))])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{bad}:3" in err and "'robot'" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (out / "metrics.json").exists()


# -- validation held out of train ---------------------------------------------------------------------


def test_validation_held_out_of_train(
    gpt2_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without validation_file, ceil(10%) of the rows are held out, chosen by task.split_seed alone: two
    runs of different train.seed validate on the same rows."""
    from lorakit.recipe.schema import TaskSection
    from lorakit.tasks.own_data import OwnData

    rows = _pairs(_e2e(shared_data, "trainset.csv", range(300, 325)))  # 25 rows: 10% is 2.5, so 3
    train_file = _write_jsonl(tmp_path / "train.jsonl", rows)
    task = {"train_file": str(train_file), "split_seed": 7}
    held: list[list[str]] = []
    for seed in (1, 2):
        out = tmp_path / f"run-{seed}"
        recipe = _write_recipe(tmp_path / f"held-{seed}.yaml", gpt2_dir, task, out, seed=seed, max_steps=1)
        recipe_data = yaml.safe_load(recipe.read_text())
        recipe_data["generation"]["max_new_tokens"] = 1
        recipe.write_text(yaml.safe_dump(recipe_data))
        _fresh_state()
        code = main(["train", str(recipe)])
        assert code == 0, capsys.readouterr().err
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["data"]["rows"] == {"train": 22, "validation": 3}
        predictions = (out / "eval" / "predictions-validation.jsonl").read_text().splitlines()
        held.append([json.loads(line)["references"][0] for line in predictions])
    assert held[0] == held[1]
    completions = [r["completion"] for r in rows]
    assert len(set(held[0])) == 3 and set(held[0]) <= set(completions)

    # The split follows split_seed: another seed holds out other rows, train and validation partition.
    def split(seed: int) -> tuple[list[str], list[str]]:
        data = OwnData(TaskSection(type="generation", train_file=str(train_file), split_seed=seed))
        return tuple([r["completion"] for r in data.table(s).rows] for s in ("train", "validation"))

    train7, validation7 = split(7)
    assert validation7 == held[0]
    assert sorted(train7 + validation7) == sorted(completions)
    assert split(8)[1] != validation7


@pytest.mark.slow
def test_two_processes_report_the_loss_peft_computes(
    tmp_path: Path, gpt2_dir: Path, tokenizer: Any, shared_data: Path
) -> None:
    """Under `--num-processes 2` the teacher-forced loader is sharded, and the last batches are padded with
    repeated rows: the reported eval_loss still counts each validation token once (PEFT, independently)."""
    import subprocess
    import sys

    rows = {
        "train": _pairs(_e2e(shared_data, "trainset.csv", range(32))),
        "validation": _pairs(_e2e(shared_data, "devset.csv", range(0, 13 * 292, 292))),  # 13: odd, uneven
    }
    files = {split: _write_jsonl(tmp_path / f"{split}.jsonl", r) for split, r in rows.items()}
    run = tmp_path / "run"
    task = {"train_file": str(files["train"]), "validation_file": str(files["validation"])}
    recipe = _write_recipe(tmp_path / "gen.yaml", gpt2_dir, task, run, batch_size=4)
    env = {**os.environ, "LORAKIT_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", str(recipe), "--num-processes", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    expected = _loss(_peft_model(gpt2_dir, run), tokenizer, rows["validation"])
    assert metrics["best"]["eval_loss"] == pytest.approx(expected, rel=1e-5)
