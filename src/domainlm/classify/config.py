"""`domainlm finetune` options, their ranges, and per-scenario presets (free of heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from domainlm.config import option
from domainlm.errors import DomainLMError

LORA_RANKS = (8, 16, 32, 64)

# A preset sets several options at once; YAML and flags still override each of them.
PRESETS = {
    "short-text": {"max_seq_len": 128, "batch_size": 32, "epochs": 5, "learning_rate": 3e-5, "warmup_ratio": 0.1},
    "long-document": {"max_seq_len": 512, "batch_size": 8, "epochs": 4, "learning_rate": 2e-5, "warmup_ratio": 0.1},
    "few-shot": {"max_seq_len": 128, "batch_size": 8, "epochs": 20, "learning_rate": 5e-5, "warmup_ratio": 0.1,
                 "early_stopping_patience": 5},
}


def metric_names(multilabel: bool, tolerant_k: int) -> list[str]:
    """The scalar metrics `finetune` computes (classify/metrics.py), known before any work starts."""
    averaged = [f"{m}_{avg}" for avg in ("macro", "micro", "weighted") for m in ("precision", "recall", "f1")]
    if multilabel:
        return ["subset_accuracy", "hamming_loss", "tolerant_accuracy", *averaged]
    return ["accuracy", f"tolerant_accuracy@{tolerant_k}", *averaged]


@dataclass(kw_only=True)
class FinetuneConfig:
    PRESETS: ClassVar[dict] = PRESETS
    train: str = option(help="labelled training data: .csv, .tsv or .jsonl")
    out: str = option(help="output folder: model/, adapter/ (LoRA), metrics.json, predictions, report.md")
    model: str = option("", "encoder to start from: HF name or path, or a `domainlm pretrain` snapshot (required "
                            "except with --method linear)")
    dev: str | None = option(None, "validation file (default: split from --train)")
    test: str | None = option(None, "test file, evaluated once at the end with the best model")
    preset: Literal["short-text", "long-document", "few-shot"] | None = option(None, "scenario preset (sets several options)")
    task: Literal["multiclass", "multilabel"] = option("multiclass", "one label per row, or several")
    method: Literal["full", "lora", "linear"] = option(
        "full", "train all weights, LoRA adapters (peft), or only the classical floor (char n-gram TF-IDF + linear model)")
    floor: bool = option(True, "also fit the classical floor on the same rows and report it beside the model")
    lora_rank: int = option(16, "LoRA rank: 8, 16, 32 or 64")
    lora_alpha: int = option(32, "LoRA alpha (scaling = alpha / rank)", low=1)
    text_column: str = option("text", "column with the text")
    pair_column: str | None = option(None, "column with a second text (sentence pairs)")
    label_column: str = option("label", "column with the label(s)")
    group_column: str | None = option(None, "column with a group for per-group accuracy")
    label_delimiter: str = option(",", "separator of several labels in one cell (multilabel; JSON lists also work)")
    labels: list[str] = option([], "the label set in order (default: every label in --train, sorted)")
    skip_bad_rows: bool = option(False, "skip and count rows with no text or no label instead of failing")
    # Early stopping picks an epoch by a dev score; on 100 rows one row is a point of accuracy, and the pick (and the
    # run-to-run spread) follows the noise. A fifth of the training rows, uncapped, is the default; a cap suits
    # quick interactive runs only.
    valid_ratio: float = option(0.2, "share of --train held out for validation when no --dev", low=0.01, high=0.5)
    valid_max_rows: int = option(0, "cap on rows held out for validation (0: no cap)", low=0)
    max_seq_len: int = option(128, "tokens per example (longer ones are truncated)", low=8)
    batch_size: int = option(16, "examples per forward pass on each process", low=1)
    global_batch_size: int | None = option(None, "examples per optimizer step (default: --batch-size x processes)", low=1)
    epochs: int = option(3, "passes over the training data", low=1, high=50)
    learning_rate: float = option(3e-5, "peak learning rate", low=0, high=1, low_open=True)
    optimizer: Literal["adamw"] = option("adamw", "optimizer")
    weight_decay: float = option(0.01, "AdamW weight decay", low=0, high=1)
    warmup_ratio: float = option(0.1, "share of steps warming up", low=0, high=1)
    min_lr_ratio: float = option(0.0, "final learning rate as a share of the peak (min_lr = lr x ratio)", low=0, high=1)
    lr_decay: Literal["linear", "cosine"] = option("linear", "decay after warmup")
    eval_steps: int = option(0, "evaluate every N steps (0: once per epoch)", low=0)
    save_steps: int = option(0, "also save the model every N steps (0: only the best)", low=0)
    metric: str = option("", "metric that picks the best model and stops early (default: accuracy / f1_micro)")
    early_stopping_patience: int = option(10, "evaluations without improvement before stopping (0: never)", low=0)
    tolerant_k: int = option(2, "multi-class tolerant accuracy: gold label within the top k", low=1)
    folds: int = option(0, "k-fold cross-validation on --train (0: off)", low=0, high=20)
    seeds: list[int] = option([1234], "repeat with each seed; metrics reported as mean and std")
    logging_freq: int = option(10, "log every N steps", low=1)
    precision: Literal["auto", "no", "bf16", "fp16"] = option("auto", "mixed precision (auto: bf16 on a GPU that has it)")
    overwrite: bool = option(False, "replace an earlier finetune run in --out (only its own files are removed)")

    def check(self) -> None:
        from domainlm import checks

        checks.metric(self.best_metric, self.multilabel, self.tolerant_k)  # before any training, not after an epoch
        if self.method == "lora" and self.lora_rank not in LORA_RANKS:
            raise DomainLMError(f"--lora-rank {self.lora_rank} is not allowed: choose 8, 16, 32 or 64")
        if self.folds == 1:
            raise DomainLMError("--folds 1 is not cross-validation: use 0 (off) or 2..20")
        if self.folds and self.test:  # each fold is scored on its held-out part; the test file would be ignored
            raise DomainLMError(f"--test {self.test} is not used with --folds {self.folds} (each fold is scored on "
                                "its held-out rows): drop --test, or --folds to score on the test file")
        if not self.seeds:
            raise DomainLMError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise DomainLMError(f"--seeds {self.seeds} repeats a seed")
        if not self.model and self.method != "linear":
            raise DomainLMError("missing required option(s): --model (only --method linear needs none)")
        known = [m for m in metric_names(self.multilabel, self.tolerant_k) if m != "hamming_loss"]  # lower is better
        if self.metric and self.metric not in known:
            raise DomainLMError(f"--metric {self.metric!r} is not computed for a {self.task} task; choose one of {', '.join(known)}")

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    @property
    def best_metric(self) -> str:
        return self.metric or ("f1_micro" if self.multilabel else "accuracy")


@dataclass(kw_only=True)
class EvaluateConfig:
    model: str = option(help="a classifier folder written by `domainlm finetune` (its model/ folder, or the --out of --method linear)")
    data: str = option(help="labelled data to evaluate on: .csv, .tsv or .jsonl")
    out: str = option(help="output folder: metrics.json, predictions, bad cases, confusion matrix, report.md")
    text_column: str = option("text", "column with the text")
    pair_column: str | None = option(None, "column with a second text")
    label_column: str = option("label", "column with the label(s)")
    group_column: str | None = option(None, "column with a group for per-group accuracy")
    label_delimiter: str = option(",", "separator of several labels in one cell")
    skip_bad_rows: bool = option(False, "skip and count rows with no text or no label instead of failing")
    batch_size: int = option(64, "examples per batch", low=1)
    max_seq_len: int = option(128, "tokens per example", low=8)
    tolerant_k: int = option(2, "multi-class tolerant accuracy: gold label within the top k", low=1)


@dataclass(kw_only=True)
class PredictConfig:
    model: str = option(help="a classifier folder written by `domainlm finetune` (its model/ folder, or the --out of --method linear)")
    input: str = option("-", "texts to classify: .csv, .tsv or .jsonl, or - for one text per line on stdin")
    out: str = option("-", "JSONL output file (- for stdout)")
    text_column: str = option("text", "column with the text")
    pair_column: str | None = option(None, "column with a second text")
    batch_size: int = option(64, "examples per batch", low=1)
    max_seq_len: int = option(128, "tokens per example", low=8)
    top_k: int = option(3, "scores of the k best labels in each line", low=1)
