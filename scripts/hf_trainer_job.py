"""The job ``lorakit train`` runs in the whole-run benchmark, written as a PEFT user writes it: datasets for
the TSV files and tokenizing, PEFT's ``get_peft_model``, the Hugging Face Trainer for the steps, its
``evaluate`` for the dev accuracy and ``save_model`` for the adapter. It imports nothing of lorakit.

    python scripts/hf_trainer_job.py MODEL_DIR DATA_DIR OUT_DIR [--bf16] [--timings FILE]

DATA_DIR holds GLUE SST-2's ``train.tsv`` and ``dev.tsv``. ``--timings`` writes where the time went, as
lorakit's metrics.json ``seconds`` does: start-up (the interpreter and its imports), data, model, steps,
evaluation, saving.
"""

from __future__ import annotations

import argparse
import csv
import json
import time

import peft
import psutil
import torch
from datasets import load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

STARTUP = time.time() - psutil.Process().create_time()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timings")
    args = parser.parse_args()
    seconds = {"start-up": STARTUP}

    tick = time.perf_counter()
    files = {"train": f"{args.data}/train.tsv", "validation": f"{args.data}/dev.tsv"}
    raw = load_dataset("csv", data_files=files, delimiter="\t", quoting=csv.QUOTE_NONE)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def encode(batch):
        return tokenizer(batch["sentence"], truncation=True, max_length=args.max_length)

    data = raw.map(encode, batched=True, remove_columns=["sentence"])
    seconds["data"] = time.perf_counter() - tick

    tick = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        modules_to_save=["classifier", "pooler"],
    )
    model = peft.get_peft_model(model, config)
    training = TrainingArguments(
        output_dir=args.out,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=args.lr,
        weight_decay=0.01,
        warmup_steps=0.06,  # below 1: a ratio of the total steps
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        train_sampling_strategy="group_by_length",
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),  # the Trainer refuses bf16 on a CPU unless told
        seed=args.seed,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=10,
        report_to="tensorboard",
    )

    def accuracy(prediction):
        return {"accuracy": 100.0 * float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    seconds["model"] = time.perf_counter() - tick

    tick = time.perf_counter()
    trainer.train()
    seconds["steps"] = time.perf_counter() - tick

    tick = time.perf_counter()
    metrics = trainer.evaluate()
    seconds["evaluation"] = time.perf_counter() - tick

    tick = time.perf_counter()
    trainer.save_model(args.out)
    seconds["saving"] = time.perf_counter() - tick
    if args.timings:
        with open(args.timings, "w") as f:
            json.dump({"seconds": seconds, "accuracy": metrics["eval_accuracy"]}, f)


if __name__ == "__main__":
    main()
