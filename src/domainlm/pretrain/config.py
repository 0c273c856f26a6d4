"""`domainlm pretrain` options (kept free of heavy imports so that `--help` is instant)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from domainlm.config import option, reuse
from domainlm.errors import DomainLMError
from domainlm.options import OptimizerOptions, PrecisionOption, RunOptions, TrainingOptions
from domainlm.pretrain.samples import parse_split


@dataclass(kw_only=True)
class PretrainConfig(TrainingOptions, OptimizerOptions, PrecisionOption, RunOptions):
    # the seed's PaddleNLP names, kept working: --max-lr, --warmup-rate, --eval-freq, --micro-batch-size
    ALIASES: ClassVar[dict] = {"micro_batch_size": "batch_size"}
    corpus: str | list[str] = option(
        help="corpus store folder from `domainlm prepare`; several, drawn by weight: "
        "--corpus general:0.3 --corpus domain:0.7"
    )
    out: str = reuse(RunOptions, "out", dataclasses.MISSING, "output folder: logs, checkpoints/, step-N snapshots")
    overwrite: bool = reuse(
        RunOptions,
        "overwrite",
        False,
        "replace an earlier pretrain run in --out, checkpoints included (--resume continues it instead)",
    )
    model: str = option(help="HF encoder to start from (name or path), or a config folder with --from-scratch")
    tokenizer: str | None = option(None, "tokenizer (name or path); default: the model's, else the corpus's")
    from_scratch: bool = option(False, "random weights from the model's config")
    split: str = option("98,1,1", "train,valid,test ratios, split by documents")
    max_seq_len: int = option(512, "tokens per sample, special tokens included", low=8)
    short_seq_prob: float = option(0.1, "probability of a shorter random target length", low=0, high=1)
    binary_head: bool = option(True, "sentence-order prediction (SOP) head and A/B segments")
    masked_lm_prob: float = option(0.15, "share of tokens to predict", low=0, high=1, low_open=True)
    max_predictions_per_seq: int | None = option(
        None, "cap on predicted tokens per sample (default: ceil(len x prob))", low=1
    )
    max_ngrams: int = option(3, "longest masked n-gram of words", low=1, high=10)
    favor_longer_ngram: bool = option(False, "favour longer n-grams (p ~ n instead of 1/n)")
    whole_word_mask: bool = option(True, "mask whole words (word starts from prepare)")
    batch_size: int = option(8, "samples per forward pass on each process (the micro batch)", low=1)
    global_batch_size: int | None = option(
        None, "samples per optimizer step (default: --batch-size x processes)", low=1
    )
    max_steps: int = option(1000, "optimizer steps", low=1)
    learning_rate: float = reuse(OptimizerOptions, "learning_rate", 1e-4)
    min_lr: float = option(1e-5, "final learning rate", low=0, high=1)
    warmup_ratio: float = reuse(OptimizerOptions, "warmup_ratio", 0.01)
    eval_steps: int = reuse(
        TrainingOptions, "eval_steps", 500, "evaluate on the validation set every N steps (0: only at the end)"
    )
    eval_iters: int = option(10, "global batches of the fixed validation samples per evaluation", low=1)
    test_iters: int = option(100, "global batches of the fixed test samples evaluated at the end", low=1)
    checkpoint_steps: int = option(500, "full checkpoint every N steps (0: only at the end)", low=0)
    keep_last: int = option(2, "checkpoints to keep (0: all)", low=0)
    resume: str | None = option(None, "auto (newest good checkpoint in --out) or a checkpoint folder")
    seed: int = option(1234, "seed for split, samples, masking, dropout and initialisation")
    compile: bool = option(False, "torch.compile the model")
    unpad: bool = option(
        True,
        "run the encoder on one stream of real tokens per micro batch (no padding); "
        "--no-unpad: the model's own padded forward",
    )
    num_workers: int | None = option(
        None,
        "DataLoader worker processes (default: 1 on a CPU; on a GPU up to 8, as "
        "the cores allow: masking for a fast GPU takes several)",
        low=0,
    )
    tensorboard: bool = option(True, "write TensorBoard event files")

    def check(self) -> None:
        from domainlm.pretrain.mixture import specs

        specs(self.corpus)
        parse_split(self.split)
        if self.min_lr > self.learning_rate:
            raise DomainLMError(f"--min-lr {self.min_lr} is above --learning-rate {self.learning_rate}")
