"""Shared fixtures: tiny models built from configs, and the real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LORAKIT_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real offline data. Missing data is a failure, never a skip: CI always has ../shared."""
    assert SHARED_DATA.is_dir(), f"real test data not found at {SHARED_DATA} (set LORAKIT_SHARED_DATA)"
    return SHARED_DATA


def tiny_roberta(num_labels: int = 2, **overrides):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = dict(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=80,
        num_labels=num_labels,
    )
    cfg.update(overrides)
    return RobertaForSequenceClassification(RobertaConfig(**cfg)).eval()


def tiny_bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=80,
            num_labels=num_labels,
        )
    ).eval()


def tiny_deberta(num_labels: int = 2):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    return DebertaV2ForSequenceClassification(
        DebertaV2Config(
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=80,
            num_labels=num_labels,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_buckets=16,
            max_relative_positions=32,
        )
    ).eval()


def tiny_gpt2(vocab_size: int = 120):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=80,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()


def randomize_lora(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every LoRA B a non-zero value (B starts at zero, which would hide any bug in the update)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def perturb_heads(model: torch.nn.Module, heads: list[str]) -> None:
    """Move the head off its initial weights, so that the saved head (not a fresh one) must be loaded."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.startswith(h + ".") for h in heads):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture
def token_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def save_tiny_roberta(out: Path, shared_data: Path, **overrides) -> Path:
    """Save a tiny RoBERTa checkpoint (real roberta-base tokenizer beside it) into ``out``."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=50265,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=130,
        type_vocab_size=1,
        pad_token_id=1,
    )
    RobertaForSequenceClassification(RobertaConfig(**{**cfg, **overrides})).save_pretrained(out)
    AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "roberta-base").save_pretrained(out)
    return out


def write_recipe(
    path: Path, model_dir: Path, task_name: str, data_dir: Path, out: Path, **sections: dict
) -> Path:
    """A small real recipe at ``path`` (64 rows, r = 4); each of ``sections`` updates its section (a dict)
    or sets a top-level key."""
    import yaml

    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "task": {
            "name": task_name,
            "data_dir": str(data_dir),
            "max_length": 64,
            "max_train_samples": 64,
            "max_eval_samples": 32,
        },
        "lora": {"r": 4, "alpha": 8},
        "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "lr": 1e-3, "log_every": 2},
        "output_dir": str(out),
    }
    for key, values in sections.items():
        recipe.setdefault(key, {}).update(values) if isinstance(values, dict) else recipe.update(
            {key: values}
        )
    path.write_text(yaml.safe_dump(recipe))
    return path


def train_glue_run(
    out: Path, base: Path, task: str, data_dir: Path, lora: dict, eval_rows: int = 20, steps: int = 4
) -> Path:
    """A real ``lorakit train`` run on ``base`` (a few steps on 32 real GLUE rows) into ``out``."""
    from lorakit.cli import main

    path = write_recipe(
        out.with_name(f"{out.name}.yaml"),
        base,
        task,
        data_dir,
        out,
        task={"max_length": 48, "max_train_samples": 32, "max_eval_samples": eval_rows},
        lora=lora,
        train={"max_steps": steps, "batch_size": 8, "eval_batch_size": 8, "lr": 5e-3, "eval_every": steps},
    )
    assert main(["train", str(path)]) == 0
    return out


def peft_three_label_adapter(out: Path, base: Path) -> Path:
    """A PEFT LoRA adapter (3 labels, q/v r=4, B random so that it changes outputs) on ``base``, saved by
    PEFT itself into ``out``."""
    import peft
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=3, ignore_mismatched_sizes=True
    )
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    wrapped.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A tiny RoBERTa checkpoint on disk with the real roberta-base tokenizer beside it."""
    return save_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"), shared_data)


@pytest.fixture(scope="session")
def no_dropout_roberta(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A tiny RoBERTa without dropout (processes draw their own dropout masks) and the real tokenizer."""
    out = tmp_path_factory.mktemp("tiny-roberta-no-dropout")
    return save_tiny_roberta(out, shared_data, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test gets a fresh Accelerate singleton state and its own 'latest run' pointer."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "lorakit-home"))
