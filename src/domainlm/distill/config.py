"""`domainlm distill` options (free of heavy imports)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from domainlm import checks
from domainlm.config import option, reuse
from domainlm.errors import DomainLMError
from domainlm.options import (
    LabelColumns,
    OptimizerOptions,
    PrecisionOption,
    RunOptions,
    TextColumns,
    TrainingOptions,
)

# the groups whose options the student's fine-tuning takes as they are
STUDENT_GROUPS = (TrainingOptions, OptimizerOptions, LabelColumns, TextColumns, PrecisionOption)


@dataclass(kw_only=True)
class DistillConfig(TrainingOptions, OptimizerOptions, LabelColumns, TextColumns, PrecisionOption, RunOptions):
    teacher: str = option(
        help="the teacher: a classifier folder (`finetune` output, its model/, a fold ensemble, an "
        "ONNX export or a linear floor)"
    )
    student: str = option(help="encoder to distil into: HF name or path, or a `domainlm pretrain` snapshot")
    train: str = option(help="labelled training data (.csv, .tsv, .jsonl) with the teacher's labels")
    out: str = reuse(
        RunOptions,
        "out",
        dataclasses.MISSING,
        "output folder: the student classifier (model/, metrics.json, report.md), distill.json/.md, "
        "teacher_cache/ (the teacher's outputs, reused on a rerun)",
    )
    overwrite: bool = reuse(
        RunOptions, "overwrite", False, "replace an earlier distill run in --out (the teacher cache is kept)"
    )
    unlabeled: str | None = option(
        None, "unlabelled texts the teacher also labels: .txt (one per line), .jsonl, .csv or .tsv (--text-column)"
    )
    corpus: str | None = option(
        None, "a `domainlm prepare` corpus store whose documents the teacher also labels (instead of --unlabeled)"
    )
    max_unlabeled: int = option(0, "at most this many unlabelled texts (0: all)", low=0)
    dev: str | None = option(None, "validation file (default: split from --train)")
    test: str | None = option(None, "test file: teacher, student (and --plain student) scored on it")
    temperature: float = option(
        2.0, "softmax temperature of the soft targets (the KL term is scaled by T^2)", low=0, low_open=True
    )
    alpha: float = option(
        0.5,
        "weight of the hard-label loss; 1 - alpha goes to the teacher's soft targets (1: hard "
        "labels only, plain fine-tuning)",
        low=0,
        high=1,
    )
    hidden_weight: float = option(
        0.0,
        "weight of matching the student's [CLS] state to the teacher's through a learned "
        "projection (students of another width; 0: off; a PyTorch teacher only)",
        low=0,
    )
    plain: bool = option(False, "also fine-tune the student plainly (same seed, same rows) and report it beside")
    floor: bool = option(True, "also fit the classical floor on the same rows and report it beside, with the tests")
    task: Literal["multiclass", "multilabel"] = option(
        "multiclass", "one label per row, or several (must match the teacher)"
    )
    valid_ratio: float = option(0.2, "share of --train held out for validation when no --dev", low=0.01, high=0.5)
    max_seq_len: int = option(128, "tokens per example (teacher and student)", low=8)
    batch_size: int = option(16, "examples per student training batch", low=1)
    teacher_batch_size: int = option(64, "examples per teacher inference batch", low=1)
    epochs: int = option(3, "passes over the training (and unlabelled) rows", low=1, high=50)
    early_stopping_patience: int = option(10, "evaluations without improvement before stopping (0: never)", low=0)
    seeds: list[int] = option([1234], "one student (and plain student) per seed; metrics as mean and std")

    def check(self) -> None:
        if self.unlabeled and self.corpus:
            raise DomainLMError("--unlabeled and --corpus both given: choose one source of unlabelled text")
        checks.seeds(self.seeds)


def student_config(cfg: DistillConfig, out: Path):
    """The student's fine-tuning options: finetune's recipe with distill's values."""
    from domainlm.classify.config import FinetuneConfig

    shared = [f.name for group in STUDENT_GROUPS for f in dataclasses.fields(group)]
    shared += [
        "train",
        "dev",
        "test",
        "task",
        "valid_ratio",
        "max_seq_len",
        "batch_size",
        "epochs",
        "early_stopping_patience",
    ]
    return FinetuneConfig(
        model=cfg.student, out=str(out), floor=False, seeds=list(cfg.seeds), **{k: getattr(cfg, k) for k in shared}
    )
