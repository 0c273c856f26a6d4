"""Option groups shared by the commands: each option is declared once, with its flag, range and help, and a command's
config is made of the groups it uses (its flags stay flat: `--learning-rate`, not `--optimizer.learning-rate`).

    RunOptions        where the output goes and how an earlier run there is treated
    PrecisionOption   one vocabulary for numeric precision, training and inference alike
    InferencePrecision  the same words where a classifier answers, and an export's int8
    TextColumns       which columns of a data file hold the text (and a second text)
    LabelColumns      which column holds the label(s), and how several are written in one cell
    OptimizerOptions  AdamW and the learning-rate schedule
    TrainingOptions   what the training loop does between optimizer steps: log, evaluate, save

A command that needs another default takes the group's field with `config.reuse`. Renamed options and choices keep
working under their old names (ALIASES / VALUE_ALIASES, with a notice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from domainlm.config import option

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_HELP = (
    "numeric precision: fp32, or bf16 / fp16 autocast (auto: bf16 on a GPU that has it and on a CPU "
    "with native bf16 (AVX512_BF16 or AMX), else fp32)"
)


@dataclass(kw_only=True)
class RunOptions:
    out: str = option(help="output folder")
    overwrite: bool = option(
        False,
        "replace an earlier run of this command in --out (only its own files are removed, as its manifest lists them)",
    )


@dataclass(kw_only=True)
class PrecisionOption:
    VALUE_ALIASES: ClassVar[dict] = {"precision": {"no": "fp32"}}
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option("auto", PRECISION_HELP)


@dataclass(kw_only=True)
class InferencePrecision:
    """A classifier's precision where it is loaded to answer (evaluate, predict, serve): an export's fp32 or int8
    model, or a PyTorch model's autocast, by the same rule as training."""

    VALUE_ALIASES: ClassVar[dict] = {"precision": {"no": "fp32"}}
    precision: Literal["auto", "fp32", "int8", "bf16", "fp16"] = option(
        "auto",
        "export folders: which model (auto: int8 if exported); PyTorch: bf16/fp16 autocast (auto: bf16 where "
        "the GPU or CPU has it natively, AVX512_BF16 or AMX; fp16 on a GPU only)",
    )


@dataclass(kw_only=True)
class TextColumns:
    text_column: str = option("text", "column with the text")
    pair_column: str | None = option(None, "column with a second text (sentence pairs)")


@dataclass(kw_only=True)
class LabelColumns:
    label_column: str = option("label", "column with the label(s)")
    label_delimiter: str = option(",", "separator of several labels in one cell (multilabel; JSON lists also work)")


@dataclass(kw_only=True)
class OptimizerOptions:
    """AdamW within the ranges torch accepts (betas in [0, 1), epsilon > 0), and the warmup-then-decay schedule."""

    ALIASES: ClassVar[dict] = {"max_lr": "learning_rate", "warmup_rate": "warmup_ratio"}
    learning_rate: float = option(3e-5, "peak learning rate", low=0, high=1, low_open=True)
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and norms)", low=0, high=1)
    adam_beta1: float = option(0.9, "AdamW beta1", low=0, high=1, high_open=True)
    adam_beta2: float = option(0.999, "AdamW beta2", low=0, high=1, high_open=True)
    adam_epsilon: float = option(1e-8, "AdamW epsilon", low=0, high=1, low_open=True)
    max_grad_norm: float = option(
        1.0, "gradient clipping norm (inf: no clipping)", low=0, low_open=True, inf="no clipping"
    )
    warmup_ratio: float = option(0.1, "share of optimizer steps spent warming up", low=0, high=1)
    lr_decay: Literal["linear", "cosine"] = option("linear", "decay after warmup")


@dataclass(kw_only=True)
class TrainingOptions:
    ALIASES: ClassVar[dict] = {"eval_freq": "eval_steps"}
    logging_freq: int = option(10, "log every N steps", low=1)
    eval_steps: int = option(0, "evaluate every N steps (0: once per epoch)", low=0)
    save_steps: int = option(0, "also save a step-N snapshot every N steps (0: none)", low=0)


def divergence_causes(cfg) -> str:
    """What usually makes a loss non-finite, in the run's own flags (the training loop names them when it stops)."""
    import math

    parts = [f"a learning rate too high (--learning-rate {cfg.learning_rate:g})"]
    if math.isinf(cfg.max_grad_norm):
        parts.append("no gradient clipping (--max-grad-norm inf)")
    if getattr(cfg, "precision", "") == "fp16":
        parts.append("fp16 overflow (--precision fp16; bf16 and fp32 have the range)")
    return ", ".join(parts)
