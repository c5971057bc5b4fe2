"""PEFT parity figures: max |Δ| between lorakit's and PEFT's outputs for the same adapter, both ways.

For tiny RoBERTa, BERT, DeBERTa-v2 and GPT-2 models (random weights, non-zero LoRA B, perturbed heads):
lorakit writes → PEFT loads, and PEFT writes → lorakit loads. Prints a table; --out saves JSON.

    python scripts/peft_parity.py --out parity.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

import peft
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from lorakit.families import lora_defaults, paper_targets, seq_cls_heads
from lorakit.lora import LoraConfig, inject_lora, load_adapter, mark_trainable, save_adapter

SIZE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=500)


def models() -> dict[str, tuple[torch.nn.Module, str]]:
    return {
        "roberta": (RobertaForSequenceClassification(RobertaConfig(**SIZE)), "SEQ_CLS"),
        "bert": (BertForSequenceClassification(BertConfig(**SIZE)), "SEQ_CLS"),
        "deberta-v2": (DebertaV2ForSequenceClassification(DebertaV2Config(**SIZE)), "SEQ_CLS"),
        "gpt2": (GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500)), "CAUSAL_LM"),
    }


def _randomize(model: torch.nn.Module, match: str) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if match in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def parity(arch: str, model: torch.nn.Module, task_type: str, ids: torch.Tensor) -> dict[str, float]:
    model.eval()
    heads = seq_cls_heads(arch) if task_type == "SEQ_CLS" else []
    with tempfile.TemporaryDirectory() as ours_dir, tempfile.TemporaryDirectory() as peft_dir:
        ours, base = model, copy.deepcopy(model)
        config = lora_defaults(ours, LoraConfig(r=8, alpha=16, modules_to_save=heads))  # the paper's targets
        inject_lora(ours, config)
        mark_trainable(ours, "none", heads)
        _randomize(ours, "lora_")
        for h in heads:
            _randomize(ours, h + ".")
        save_adapter(ours, ours_dir, config, task_type=task_type)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), ours_dir).eval()
        with torch.no_grad():
            forward = (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item()
            # How far the adapter moves the outputs: parity of 0 means something only if this is not.
            effect = (ours(input_ids=ids).logits - base(input_ids=ids).logits).abs().max().item()

        targets = [t.split("[")[0] for t in paper_targets(arch)]
        cfg = peft.LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=targets,
            init_lora_weights=False,
            task_type=task_type,
            modules_to_save=heads or None,
            fan_in_fan_out=arch == "gpt2",
        )
        peft_model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
        peft_model.save_pretrained(peft_dir)
        fresh = copy.deepcopy(base)
        load_adapter(fresh, peft_dir)
        with torch.no_grad():
            backward = (fresh(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max().item()
    return {"adapter_effect": effect, "lorakit_to_peft": forward, "peft_to_lorakit": backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file for the figures")
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (4, 24), generator=torch.Generator().manual_seed(1))
    results = {arch: parity(arch, m, tt, ids) for arch, (m, tt) in models().items()}
    print(
        f"{'architecture':<12} {'adapter effect':>15} {'lorakit→PEFT max|Δ|':>22} {'PEFT→lorakit max|Δ|':>22}"
    )
    for arch, r in results.items():
        print(
            f"{arch:<12} {r['adapter_effect']:>15.2e} "
            f"{r['lorakit_to_peft']:>22.2e} {r['peft_to_lorakit']:>22.2e}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
