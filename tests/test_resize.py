"""``lorakit resize``: lossless at K ≥ r (outputs through lorakit and through PEFT equal the original
adapter's), the Eckart–Young error below it, ``--energy``, GPT-2's fused slices, the output accepted by
``lorakit eval``, ``merge`` and PEFT, and one-line usage errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from conftest import randomize_lora, tiny_gpt2, train_glue_run
from safetensors.numpy import load_file
from transformers import AutoModelForSequenceClassification, GPT2LMHeadModel

from lorakit.cli import main
from lorakit.lora import LoraConfig, inject_lora, load_adapter, save_adapter, unload_lora

PREFIX = "base_model.model."
MODULES = [f"roberta.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, shared_data: Path) -> Path:
    """A real tiny run, r = 4, alpha = 32 (scale 8, so that 6 steps move the outputs measurably): an update
    of full rank 4."""
    out = tmp_path_factory.mktemp("resize") / "run"
    return train_glue_run(
        out, tiny_roberta_dir, "sst2", shared_data / "glue" / "SST-2", {"r": 4, "alpha": 32}, steps=6
    )


def _outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits and the last layer's hidden states, side by side: the head alone can hide an update."""
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


def _lorakit_outputs(run_dir: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from lorakit.models import load_trained
    from lorakit.recipe import load_recipe
    from lorakit.tasks import get_task

    recipe = load_recipe(run_dir / "recipe.yaml")
    prepared = load_trained(run_dir, recipe, get_task(recipe.task.name, recipe.task.data_dir))
    return _outputs(prepared.model, batch)


def _peft_outputs(base_dir: Path, adapter_dir: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    return _outputs(peft.PeftModel.from_pretrained(base, adapter_dir).eval(), batch)


def _delta(tensors: dict[str, np.ndarray], name: str, scale: float) -> np.ndarray:
    a, b = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
    return scale * b.astype(np.float64) @ a.astype(np.float64)


@pytest.mark.parametrize("k", [4, 6])
def test_lossless_at_or_above_the_rank(
    k: int, run: Path, tiny_roberta_dir: Path, tmp_path: Path, token_batch: dict[str, torch.Tensor]
) -> None:
    out = tmp_path / f"r{k}"
    assert main(["resize", str(run), "--rank", str(k), "--out", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 4, {})  # min(K, r) kept
    record = json.loads((out / "resize.json").read_text())
    assert all(m["rank"] == 4 and m["relative_error"] < 1e-6 for m in record["modules"].values())
    original = _lorakit_outputs(run, token_batch)
    torch.testing.assert_close(_lorakit_outputs(out, token_batch), original, rtol=0, atol=1e-5)
    torch.testing.assert_close(_peft_outputs(tiny_roberta_dir, out, token_batch), original, rtol=0, atol=1e-5)
    if k == 4:  # the outputs do feel the update: dropping to rank 1 moves them by far more than 1e-5
        assert main(["resize", str(run), "--rank", "1", "--out", str(tmp_path / "r1")]) == 0
        assert (_lorakit_outputs(tmp_path / "r1", token_batch) - original).abs().max() > 1e-3


def test_truncation_error_is_the_eckart_young_tail(run: Path, tiny_roberta_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r2"
    assert main(["resize", str(run), "--rank", "2", "--out", str(out)]) == 0
    before, after = load_file(run / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    record = json.loads((out / "resize.json").read_text())["modules"]
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 2  # alpha'/r' = 1
    base = AutoModelForSequenceClassification.from_pretrained(tiny_roberta_dir, num_labels=2)
    peft_model = peft.PeftModel.from_pretrained(base, out)
    for name in MODULES:
        delta = _delta(before, name, 32 / 4)
        u, s, vh = np.linalg.svd(delta)
        tail = np.sqrt((s[2:] ** 2).sum()) / np.linalg.norm(delta)
        assert s[3] > 1e-3 * s[0]  # a real rank-4 update, so the tail is not trivially zero
        assert record[name]["relative_error"] == pytest.approx(tail, rel=1e-4)
        assert record[name]["eckart_young_error"] == pytest.approx(tail, rel=1e-6)
        best = u[:, :2] @ np.diag(s[:2]) @ vh[:2]
        new = _delta(after, name, 1.0)
        assert after[f"{PREFIX}{name}.lora_A.weight"].shape == (2, 32)
        np.testing.assert_allclose(new, best, atol=1e-6 * np.linalg.norm(delta))
        peft_delta = peft_model.base_model.model.get_submodule(name).get_delta_weight("default")
        np.testing.assert_allclose(peft_delta.double().numpy(), best, atol=1e-6 * np.linalg.norm(delta))
    heads = [k for k in before if "lora_" not in k]
    assert heads and all(np.array_equal(before[k], after[k]) for k in heads)  # the head, copied unchanged


def test_energy_picks_each_modules_rank(
    run: Path, tiny_roberta_dir: Path, tmp_path: Path, token_batch: dict[str, torch.Tensor]
) -> None:
    out = tmp_path / "e"
    assert main(["resize", str(run), "--energy", "0.9", "--out", str(out)]) == 0
    before = load_file(run / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    record = json.loads((out / "resize.json").read_text())["modules"]
    ranks = {}
    for name in MODULES:
        s = np.linalg.svd(_delta(before, name, 8.0), compute_uv=False)
        share = np.cumsum(s**2) / np.sum(s**2)
        ranks[name] = int(np.argmax(share >= 0.9)) + 1
        assert record[name]["rank"] == ranks[name] and record[name]["energy_kept"] >= 0.9
        r = config["rank_pattern"].get(name, config["r"])
        assert r == ranks[name] and config["alpha_pattern"].get(name, config["lora_alpha"]) == r
    # Both readers of rank_pattern/alpha_pattern build the same model from it.
    torch.testing.assert_close(
        _peft_outputs(tiny_roberta_dir, out, token_batch),
        _lorakit_outputs(out, token_batch),
        rtol=0,
        atol=1e-5,
    )


def test_eval_and_merge_accept_the_output(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r4"
    assert main(["resize", str(run), "--rank", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    original = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out)]) == 0
    resized = json.loads(capsys.readouterr().out)
    assert resized["accuracy"] == original["accuracy"]
    preds = (out / "eval" / "predictions-validation.jsonl").read_text().splitlines()
    assert preds == (run / "eval" / "predictions-validation.jsonl").read_text().splitlines()
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_gpt2_fused_slices(tmp_path: Path) -> None:
    """c_attn[q, v] (fused Conv1D) and c_proj: lossless at K = r through lorakit and PEFT; at K = 1 each
    slice is its own best rank-1 approximation, and the k slice stays untouched."""
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "base")
    config = LoraConfig(
        r=3, alpha=6, target_modules=["c_attn[q,v]", "attn.c_proj"], fused_slices={"c_attn": ("q", "k", "v")}
    )
    inject_lora(model, config)
    randomize_lora(model, seed=5)
    save_adapter(model, tmp_path / "adapter", config, str(tmp_path / "base"), "CAUSAL_LM")
    ids = torch.randint(1, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = model(input_ids=ids).logits
    merged = unload_lora(copy.deepcopy(model), merge=True).state_dict()
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base").state_dict()
    for k, out in ((3, tmp_path / "r3"), (1, tmp_path / "r1")):
        assert main(["resize", str(tmp_path / "adapter"), "--rank", str(k), "--out", str(out)]) == 0
        ours = GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
        load_adapter(ours, out)
        theirs = peft.PeftModel.from_pretrained(
            GPT2LMHeadModel.from_pretrained(tmp_path / "base"), out
        ).eval()
        with torch.no_grad():
            ours_logits, theirs_logits = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        torch.testing.assert_close(ours_logits, theirs_logits, rtol=0, atol=1e-5)
        if k == 3:
            torch.testing.assert_close(ours_logits, original, rtol=0, atol=1e-5)
            continue
        resized = unload_lora(ours, merge=True).state_dict()
        for layer in range(2):
            key = f"transformer.h.{layer}.attn.c_attn.weight"
            w0, full, new = (t[key].double().numpy().T for t in (base, merged, resized))  # (out, in)
            for slot, name in enumerate("qkv"):
                rows = slice(32 * slot, 32 * (slot + 1))
                delta, got = full[rows] - w0[rows], new[rows] - w0[rows]
                if name == "k":
                    np.testing.assert_array_equal(got, 0.0)
                    continue
                u, s, vh = np.linalg.svd(delta)
                np.testing.assert_allclose(got, s[0] * np.outer(u[:, 0], vh[0]), atol=1e-5)
                record = json.loads((out / "resize.json").read_text())["modules"]
                tail = np.sqrt((s[1:] ** 2).sum()) / np.linalg.norm(delta)
                assert record[f"transformer.h.{layer}.attn.c_attn[{name}]"][
                    "relative_error"
                ] == pytest.approx(tail, rel=1e-4)


def test_usage_errors_are_one_line(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    cases = [
        ["resize", str(run), "--rank", "0"],
        ["resize", str(run), "--rank", "2", "--energy", "0.9"],
        ["resize", str(run)],
        ["resize", str(run), "--energy", "1.5"],
        ["resize", str(tmp_path / "missing"), "--rank", "2"],
        ["resize", str(run), "--rank", "2", "--out", str(mine)],
        ["resize", str(run), "--rank", "2", "--out", str(run)],
    ]
    for args in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("lorakit: error:") and "\n" not in err and "Traceback" not in err, err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "missing-r2").exists()
    # The default --out, and a second resize into it (an earlier resize output) replaces it.
    for _ in range(2):
        assert main(["resize", str(run), "--rank", "3"]) == 0
    out = run.with_name(f"{run.name}-r3")
    assert json.loads((out / "resize.json").read_text())["rank"] == 3
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
