"""`domainlm finetune` options, their ranges, and per-scenario presets (free of heavy imports)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from domainlm import checks
from domainlm.config import option, reuse
from domainlm.errors import DomainLMError
from domainlm.options import (
    InferencePrecision,
    LabelColumns,
    OptimizerOptions,
    PrecisionOption,
    RunOptions,
    TextColumns,
    TrainingOptions,
)

LORA_RANKS = (8, 16, 32, 64)
# tokens per example when nothing says otherwise: finetune's default, and what inference uses for a classifier
# saved without its own setting (a plain HF folder); a classifier saved by domainlm carries the length it was trained at
MAX_SEQ_LEN = 128
DEVICE_HELP = "where the model runs (auto: a CUDA GPU when PyTorch sees one, else the CPU)"

# A preset sets several options at once; YAML and flags still override each of them.
PRESETS = {
    "short-text": {
        "max_seq_len": MAX_SEQ_LEN,
        "batch_size": 32,
        "epochs": 5,
        "learning_rate": 3e-5,
        "warmup_ratio": 0.1,
    },
    "long-document": {"max_seq_len": 512, "batch_size": 8, "epochs": 4, "learning_rate": 2e-5, "warmup_ratio": 0.1},
    "few-shot": {
        "max_seq_len": MAX_SEQ_LEN,
        "batch_size": 8,
        "epochs": 20,
        "learning_rate": 5e-5,
        "warmup_ratio": 0.1,
        "early_stopping_patience": 5,
    },
    # a 1.3B encoder on many labels (the settings of a published MegatronBert fine-tune): bf16 where the machine
    # has it natively (precision auto), a 1% dev split of a large task
    "large-model": {
        "max_seq_len": 512,
        "batch_size": 32,
        "epochs": 4,
        "learning_rate": 1e-5,
        "lr_decay": "cosine",
        "warmup_ratio": 0.01,
        "adam_beta1": 0.9,
        "adam_beta2": 0.98,
        "adam_epsilon": 1e-8,
        "weight_decay": 0.1,
        "max_grad_norm": 1.0,
        "precision": "auto",
        "valid_ratio": 0.01,
        "eval_steps": 200,
    },
}


# metrics where lower is better: never a --metric to maximise
LOWER_IS_BETTER = ("hamming_loss", "mae_classes")


@dataclass(kw_only=True)
class FinetuneConfig(TrainingOptions, OptimizerOptions, LabelColumns, TextColumns, PrecisionOption, RunOptions):
    PRESETS: ClassVar[dict] = PRESETS
    train: str = option(help="labelled training data: .csv, .tsv or .jsonl")
    out: str = reuse(
        RunOptions,
        "out",
        dataclasses.MISSING,
        "output folder: model/, adapter/ (LoRA), metrics.json, predictions, report.md",
    )
    model: str = option(
        "",
        "encoder to start from: HF name or path, or a `domainlm pretrain` snapshot (required "
        "except with --method linear)",
    )
    dev: str | None = option(None, "validation file (default: split from --train)")
    test: str | None = option(None, "test file, evaluated once at the end with the best model")
    preset: Literal["short-text", "long-document", "few-shot", "large-model"] | None = option(
        None, "scenario preset (sets several options)"
    )
    task: Literal["multiclass", "multilabel"] = option("multiclass", "one label per row, or several")
    method: Literal["full", "lora", "linear"] = option(
        "full",
        "train all weights, LoRA adapters (peft), or only the classical floor (char n-gram TF-IDF + linear model)",
    )
    floor: bool = option(True, "also fit the classical floor on the same rows and report it beside the model")
    blend: bool = option(
        False,
        "also report w x model + (1-w) x floor probabilities, w chosen on the dev rows (or the "
        "out-of-fold rows with --folds), never on test",
    )
    lora_rank: int = option(16, "LoRA rank: 8, 16, 32 or 64")
    lora_alpha: int = option(32, "LoRA alpha (scaling = alpha / rank)", low=1)
    group_column: str | None = option(None, "column with a group for per-group accuracy")
    labels: list[str] = option([], "the label set in order (default: every label in --train, sorted)")
    skip_bad_rows: bool = option(False, "skip and count rows with no text or no label instead of failing")
    # Early stopping picks an epoch by a dev score; on 100 rows one row is a point of accuracy, and the pick (and the
    # run-to-run spread) follows the noise. A fifth of the training rows, uncapped, is the default; a cap suits
    # quick interactive runs only.
    valid_ratio: float = option(0.2, "share of --train held out for validation when no --dev", low=0.01, high=0.5)
    valid_max_rows: int = option(0, "cap on rows held out for validation (0: no cap)", low=0)
    max_seq_len: int = option(MAX_SEQ_LEN, "tokens per example (longer ones are truncated)", low=8)
    batch_size: int = option(16, "examples per forward pass on each process", low=1)
    global_batch_size: int | None = option(
        None, "examples per optimizer step (default: --batch-size x processes)", low=1
    )
    epochs: int = option(3, "passes over the training data", low=1, high=50)
    optimizer: Literal["adamw"] = option("adamw", "optimizer")
    layer_lr_decay: float = option(
        1.0,
        "layer-wise lr decay: the head trains at the lr, each layer below at this "
        "factor times the one above, the embeddings last (1: off)",
        low=0,
        high=1,
        low_open=True,
    )
    gradient_checkpointing: bool = option(
        False, "recompute each layer's activations in the backward pass: less memory, about a third more compute"
    )
    min_lr_ratio: float = option(0.0, "final learning rate as a share of the peak (min_lr = lr x ratio)", low=0, high=1)
    metric: str = option("", "metric that picks the best model and stops early (default: accuracy / f1_micro)")
    early_stopping_patience: int = option(10, "evaluations without improvement before stopping (0: never)", low=0)
    tolerant_k: int = option(2, "multi-class tolerant accuracy: gold label within the top k", low=1)
    ordinal: bool = option(
        False,
        "the labels are ordered (--labels, or numeric labels by value): also report mean "
        "absolute error in classes and accuracy within +-1 class",
    )
    folds: int = option(0, "k-fold cross-validation on --train (0: off)", low=0, high=20)
    seeds: list[int] = option([1234], "repeat with each seed; metrics reported as mean and std")
    unpad: Literal["auto", "yes", "no"] = option(
        "auto",
        "run BERT/ERNIE classifiers on one stream of real tokens per batch (auto: wherever the model's blocks "
        "are ones the packed encoder runs; no: the padded forward)",
    )

    def check(self) -> None:
        from domainlm.classify.metrics import metric_names

        names = metric_names(self.multilabel, self.tolerant_k, self.ordinal)
        if self.best_metric not in names:  # before any training, not after an epoch
            raise DomainLMError(
                f"--metric {self.best_metric!r} is not computed for a {self.task} task; choose one of "
                f"{', '.join(names)}"
            )
        if self.method == "lora" and self.lora_rank not in LORA_RANKS:
            raise DomainLMError(f"--lora-rank {self.lora_rank} is not allowed: choose 8, 16, 32 or 64")
        if self.folds == 1:
            raise DomainLMError("--folds 1 is not cross-validation: use 0 (off) or 2..20")
        checks.seeds(self.seeds)
        if self.blend and (not self.floor or self.method == "linear"):
            raise DomainLMError(
                "--blend mixes the transformer with the floor: it needs --floor and --method full or lora"
            )
        if self.blend and not self.folds and len(self.seeds) > 1:
            raise DomainLMError("--blend takes one seed (or --folds): each seed would choose its own weight")
        if not self.model and self.method != "linear":
            raise DomainLMError("missing required option(s): --model (only --method linear needs none)")
        if self.ordinal and self.multilabel:
            raise DomainLMError("--ordinal needs --task multiclass (one label per row on an ordered scale)")
        known = [m for m in names if m not in LOWER_IS_BETTER]
        if self.metric and self.metric not in known:
            raise DomainLMError(
                f"--metric {self.metric!r} is not computed for a {self.task} task; choose one of {', '.join(known)}"
            )

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def inference_settings(self) -> dict:
        """Saved with every classifier: what evaluate, predict, serve and export take as their defaults."""
        return {
            "task": self.task,
            "max_seq_len": self.max_seq_len,
            "text_column": self.text_column,
            "pair_column": self.pair_column,
        }

    @property
    def best_metric(self) -> str:
        return self.metric or ("f1_micro" if self.multilabel else "accuracy")


INFERENCE_TEXT = "column with the text (default: the model's, else text)"
INFERENCE_PAIR = "column with a second text (default: the model's, if any)"
INFERENCE_BATCH = "examples per batch (0: 64 on a CPU, 512 on a GPU; long texts run in fewer)"
INFERENCE_LENGTH = "tokens per example (0: the length the model was trained at)"


@dataclass(kw_only=True)
class EvaluateConfig(LabelColumns, TextColumns, InferencePrecision, RunOptions):
    model: str = option(
        help="a classifier folder written by `domainlm finetune` (its model/ folder, or the --out of --method linear)"
    )
    data: str = option(help="labelled data to evaluate on: .csv, .tsv or .jsonl")
    out: str = reuse(
        RunOptions,
        "out",
        dataclasses.MISSING,
        "output folder: metrics.json, predictions, bad cases, confusion matrix, report.md",
    )
    text_column: str | None = reuse(TextColumns, "text_column", None, INFERENCE_TEXT)
    pair_column: str | None = reuse(TextColumns, "pair_column", None, INFERENCE_PAIR)
    group_column: str | None = option(None, "column with a group for per-group accuracy")
    skip_bad_rows: bool = option(False, "skip and count rows with no text or no label instead of failing")
    batch_size: int = option(0, INFERENCE_BATCH, low=0)
    max_seq_len: int = option(0, INFERENCE_LENGTH, low=0)
    device: Literal["auto", "cpu", "cuda"] = option("auto", DEVICE_HELP)
    tolerant_k: int = option(2, "multi-class tolerant accuracy: gold label within the top k", low=1)
    ordinal: bool = option(
        False,
        "the model's labels are ordered (in their saved order): also report mean absolute "
        "error in classes and accuracy within +-1 class",
    )


@dataclass(kw_only=True)
class PredictConfig(TextColumns, InferencePrecision):
    model: str = option(
        help="a classifier folder written by `domainlm finetune` (its model/ folder, or the --out of --method linear)"
    )
    input: str = option("-", "texts to classify: .csv, .tsv or .jsonl, or - for one text per line on stdin")
    out: str = option("-", "JSONL output file (- for stdout)")
    overwrite: bool = option(False, "replace an existing --out file")
    text_column: str | None = reuse(TextColumns, "text_column", None, INFERENCE_TEXT)
    pair_column: str | None = reuse(TextColumns, "pair_column", None, INFERENCE_PAIR)
    batch_size: int = option(0, INFERENCE_BATCH, low=0)
    max_seq_len: int = option(0, INFERENCE_LENGTH, low=0)
    device: Literal["auto", "cpu", "cuda"] = option("auto", DEVICE_HELP)
    top_k: int = option(3, "scores of the k best labels in each line", low=1)
