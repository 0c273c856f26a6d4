"""Checks of options against a model and the run, run before any work starts (each error names the flag). Each rule
is written once here; the commands' own checks (classify/checks.py, pretrain/checks.py) and the console use them."""

from __future__ import annotations

from pathlib import Path

from domainlm.errors import DomainLMError


def position_limit(config) -> int | None:
    """Longest input the model's position embeddings take (RoBERTa-style models reserve the first two)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    return limit - 2 if "roberta" in str(getattr(config, "model_type", "")) else int(limit)


def max_seq_len(config, value: int, model: str, cap: bool = False) -> int:
    """The length to use: `value`, or an error when it exceeds the model's positions. With `cap` (evaluate,
    predict: the model fixes the limit, nothing is trained) the model's limit is used instead, with a notice."""
    limit = position_limit(config)
    if limit is None or value <= limit:
        return value
    if cap:
        import sys

        print(f"--max-seq-len {value} is more than {model} takes ({limit} positions); using {limit}", file=sys.stderr)
        return limit
    raise DomainLMError(
        f"--max-seq-len {value} exceeds what the model {Path(model).name} can take ({limit} positions); "
        f"use --max-seq-len {limit} or less"
    )


def accumulation(global_batch: int | None, batch_size: int, processes: int = 1) -> int:
    """Micro batches per optimizer step on each process: --global-batch-size over --batch-size x processes."""
    global_batch = global_batch or batch_size * processes
    if global_batch % (batch_size * processes):
        where = f" x {processes} processes" if processes > 1 else ""
        raise DomainLMError(f"--global-batch-size {global_batch} is not a multiple of --batch-size {batch_size}{where}")
    return global_batch // (batch_size * processes)


def seeds(values: list[int], name: str = "--seeds") -> None:
    if not values:
        raise DomainLMError(f"{name} needs at least one seed")
    if len(set(values)) != len(values):
        raise DomainLMError(f"{name} {values} repeats a seed")


def first(errors: dict[str, str]) -> None:
    """A command's checks found problems (by field): the first is its error."""
    if errors:
        raise DomainLMError(next(iter(errors.values())))


def tokenizer_fits(tokenizer, config, model: str) -> None:
    """A tokenizer far smaller than the model's embeddings is not the model's (a converted folder without its
    vocab.txt loads as the 5 special tokens): every text would become [UNK]."""
    size = getattr(config, "vocab_size", None)
    if size and 2 * len(tokenizer) < size:
        raise DomainLMError(
            f"--model {model}: its tokenizer has {len(tokenizer)} entries for a model of {size} "
            "embeddings, so it is not the model's tokenizer; put the model's vocab.txt (or tokenizer "
            "files) into the folder"
        )


def label_map(labels: list[str], model, path: str) -> None:
    """A label list that does not match the classifier's outputs would score phantom (or lost) classes."""
    config = getattr(model, "config", None)  # a transformer; a linear model keeps its own labels
    outputs = getattr(config, "num_labels", len(labels))
    if len(labels) != outputs:
        where = Path(path) / "domainlm_labels.json"
        raise DomainLMError(
            f"{where} lists {len(labels)} labels but the model in {path} has {outputs} outputs; "
            "the label map belongs to another model: fine-tune again or restore the matching file"
        )
