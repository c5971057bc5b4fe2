"""Adapter files: PEFT parity in both directions on tiny RoBERTa, BERT, DeBERTa-v2 and GPT-2 models,
the GPT-2 q/v slice encoding, atomic writes, and the import of the paper's loralib checkpoint."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import peft
import pytest
import torch
from conftest import randomize_lora, tiny_bert, tiny_deberta, tiny_gpt2, tiny_roberta
from safetensors.torch import load_file

from lorakit.families import lora_defaults, seq_cls_heads
from lorakit.lora import (
    LoraConfig,
    LoraFusedLinear,
    import_loralib_checkpoint,
    inject_lora,
    load_adapter,
    lora_modules,
    mark_trainable,
    save_adapter,
)

CASES = {
    "roberta": (tiny_roberta, "SEQ_CLS", seq_cls_heads("roberta")),
    "bert": (tiny_bert, "SEQ_CLS", seq_cls_heads("bert")),
    "deberta-v2": (tiny_deberta, "SEQ_CLS", seq_cls_heads("deberta-v2")),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", []),
}


def _perturb_heads(model: torch.nn.Module, heads: list[str]) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.startswith(h + ".") for h in heads):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("arch", CASES)
def test_peft_loads_what_lorakit_writes(arch: str, tmp_path: Path, token_batch) -> None:
    factory, task_type, heads = CASES[arch]
    model = factory()
    base = copy.deepcopy(model)
    config = lora_defaults(model, LoraConfig(r=4, alpha=8, modules_to_save=heads))  # the paper's targets
    inject_lora(model, config)
    mark_trainable(model, config.bias, heads)
    randomize_lora(model)
    _perturb_heads(model, heads)
    save_adapter(model, tmp_path, config, base_model_name_or_path="tiny", task_type=task_type)

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == task_type
    assert written["fan_in_fan_out"] is (arch == "gpt2")
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.") for k in keys)
    assert any(k.endswith(".lora_A.weight") for k in keys)

    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        ours, theirs = model(**token_batch).logits, peft_model(**token_batch).logits
    assert _max_diff(ours, theirs) <= 1e-5


@pytest.mark.parametrize("arch", CASES)
def test_lorakit_loads_what_peft_writes(arch: str, tmp_path: Path, token_batch) -> None:
    factory, task_type, heads = CASES[arch]
    base = factory()
    fresh = copy.deepcopy(base)
    targets = {
        "roberta": ["query", "value"],
        "bert": ["query", "value"],
        "deberta-v2": ["query_proj", "value_proj"],
        "gpt2": ["c_attn", "c_proj"],
    }[arch]
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=targets,
        init_lora_weights=False,
        task_type=task_type,
        modules_to_save=heads or None,
        fan_in_fan_out=arch == "gpt2",
    )
    peft_model = peft.get_peft_model(base, cfg).eval()
    _perturb_heads(peft_model.base_model.model, [f"{h}.modules_to_save.default" for h in heads])
    peft_model.save_pretrained(tmp_path)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.r == 4 and loaded.alpha == 16
    with torch.no_grad():
        theirs, ours = peft_model(**token_batch).logits, fresh(**token_batch).logits
    assert _max_diff(ours, theirs) <= 1e-5


def test_gpt2_slices_round_trip_as_a_block_structured_rank_2r_lora(tmp_path: Path, token_batch) -> None:
    model = tiny_gpt2()
    fresh = copy.deepcopy(model)
    config = lora_defaults(
        model, LoraConfig(r=4, alpha=32)
    )  # the paper's GPT-2 setting: c_attn q and v slices
    inject_lora(model, config)
    randomize_lora(model)
    save_adapter(model, tmp_path, config, task_type="CAUSAL_LM")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == ["c_attn"]
    assert written["rank_pattern"] == {"c_attn": 8} and written["alpha_pattern"] == {"c_attn": 64.0}
    b = load_file(tmp_path / "adapter_model.safetensors")[
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    ]
    assert b.shape == (96, 8)
    assert torch.count_nonzero(b[32:64]) == 0  # no k update
    assert torch.count_nonzero(b[:32, 4:]) == 0 and torch.count_nonzero(b[64:, :4]) == 0

    load_adapter(fresh, tmp_path)
    fused = dict(lora_modules(fresh))
    assert all(
        isinstance(m, LoraFusedLinear) and m.adapted == ("q", "v") and m.r == 4 for m in fused.values()
    )
    for (_, a), (_, b2) in zip(lora_modules(model), lora_modules(fresh), strict=True):
        for p, q in zip(a.parameters(), b2.parameters(), strict=True):
            assert torch.equal(p, q)
    with torch.no_grad():
        assert _max_diff(model(**token_batch).logits, fresh(**token_batch).logits) == 0.0


def test_rslora_and_bias_are_carried_to_peft(tmp_path: Path, token_batch) -> None:
    model = tiny_roberta()
    base = copy.deepcopy(model)
    config = LoraConfig(
        r=4,
        alpha=8,
        target_modules=["query", "value"],
        use_rslora=True,
        bias="lora_only",
        modules_to_save=["classifier"],
    )
    inject_lora(model, config)
    mark_trainable(model, config.bias, config.modules_to_save)
    randomize_lora(model)
    with torch.no_grad():
        model.roberta.encoder.layer[0].attention.self.query.base_layer.bias.add_(0.5)
    save_adapter(model, tmp_path, config, task_type="SEQ_CLS")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert _max_diff(model(**token_batch).logits, peft_model(**token_batch).logits) <= 1e-5


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_roberta()
    config = LoraConfig(r=2, alpha=4, target_modules=["query", "value"])
    inject_lora(model, config)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", crash)  # the weights file is written as ready bytes
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "out", config)
    assert list((tmp_path / "out").iterdir()) == []  # no half-written file, no temp left behind


def test_loralib_checkpoint_converts_losslessly_and_peft_applies_alpha_over_r_ba(
    shared_data: Path, tmp_path: Path
) -> None:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    ckpt = shared_data / "checkpoints" / "roberta_base_lora_mnli.bin"
    original = torch.load(ckpt, map_location="cpu", weights_only=True)
    import_loralib_checkpoint(ckpt, tmp_path, alpha=16, base_model_name_or_path="roberta-base")

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        written["r"] == 8 and written["lora_alpha"] == 16 and written["target_modules"] == ["query", "value"]
    )
    assert written["modules_to_save"] == ["classifier"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == len(original) == 52
    for key, value in original.items():
        new_key = "base_model.model." + key + (".weight" if key.endswith((".lora_A", ".lora_B")) else "")
        assert torch.equal(tensors[new_key], value), key

    torch.manual_seed(0)  # a roberta-base-shaped model with random weights (no hub here)
    cfg = RobertaConfig(
        vocab_size=1000,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        num_labels=3,
    )
    base = RobertaForSequenceClassification(cfg).eval()
    ours = copy.deepcopy(base)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    for layer in (0, 11):
        for proj in ("query", "value"):
            prefix = f"roberta.encoder.layer.{layer}.attention.self.{proj}"
            module = peft_model.base_model.model.get_submodule(prefix)
            expected = 2.0 * original[prefix + ".lora_B"] @ original[prefix + ".lora_A"]  # alpha / r = 16 / 8
            torch.testing.assert_close(module.get_delta_weight("default"), expected, rtol=0, atol=1e-6)
    load_adapter(ours, tmp_path)
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _max_diff(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits) <= 1e-5


def test_load_adapter_keeps_only_the_tensors_the_filter_keeps(tmp_path: Path, token_batch) -> None:
    heads = seq_cls_heads("roberta")
    config = LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=heads)
    source = tiny_roberta()
    inject_lora(source, config)
    mark_trainable(source, "none", heads)
    randomize_lora(source)
    _perturb_heads(source, heads)
    save_adapter(source, tmp_path, config)

    target = tiny_roberta()
    fresh_head = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("classifier.")}
    load_adapter(target, tmp_path, keep=lambda name: not name.startswith("classifier."))
    loaded = dict(target.named_parameters())
    for name, value in fresh_head.items():  # the head is the target's own, untouched
        assert torch.equal(loaded[name], value), name
    for path, module in lora_modules(source):  # every LoRA pair came from the file
        assert torch.equal(target.get_submodule(path).lora_A, module.lora_A)
        assert torch.equal(target.get_submodule(path).lora_B, module.lora_B)


def test_adapter_files_are_the_same_bytes_whatever_order_safetensors_keeps_metadata_in() -> None:
    """safetensors' writer orders metadata keys by a per-process hash; lorakit sorts them, so that two
    identical runs write identical adapter files (checked here across fresh interpreters)."""
    import subprocess
    import sys

    from safetensors import safe_open

    from lorakit.lora.files import safetensors_bytes

    script = (
        "import sys, torch; from lorakit.lora.files import safetensors_bytes; "
        "meta = {'format': 'pt', 'lorakit.task_kind': 'multilabel', 'lorakit.label_names': '[\"a\", \"é\"]', "
        "'lorakit.fused_slices': '{}'}; "
        "sys.stdout.buffer.write(safetensors_bytes({'b': torch.arange(6.0), 'a': torch.ones(3)}, meta))"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, check=True).stdout
        for _ in range(4)
    }
    assert len(outputs) == 1
    data = outputs.pop()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert (8 + int.from_bytes(data[:8], "little")) % 8 == 0
    path = Path(tempfile.mkdtemp()) / "x.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["lorakit.label_names"] == '["a", "é"]'
        assert torch.equal(f.get_tensor("b"), torch.arange(6.0)) and torch.equal(
            f.get_tensor("a"), torch.ones(3)
        )
    assert safetensors_bytes({"a": torch.ones(1)}) == safetensors_bytes({"a": torch.ones(1)})
