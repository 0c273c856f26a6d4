"""Checks of options against the model and the task, run before any work starts (each error names the flag)."""

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
        f"--max-seq-len {value} exceeds what {model} can take (max_position_embeddings {limit}); "
        f"use --max-seq-len {limit} or less"
    )


def tokenizer_fits(tokenizer, config, model: str) -> None:
    """A tokenizer far smaller than the model's embeddings is not the model's (a converted folder without its
    vocab.txt loads as the 5 special tokens): every text would become [UNK]."""
    size = getattr(config, "vocab_size", None)
    if size and 2 * len(tokenizer) < size:
        raise DomainLMError(f"--model {model}: its tokenizer has {len(tokenizer)} entries for a model of {size} "
                            "embeddings, so it is not the model's tokenizer; put the model's vocab.txt (or tokenizer "
                            "files) into the folder")


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
