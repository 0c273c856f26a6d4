"""The checks a command makes at start-up, made when the job is created instead: each command's own check
(classify.checks, pretrain.checks, distill.checks: the same code the CLI runs), without waiting on a model hub, so
that a job that would fail in its first seconds is refused at once with every reason, each under its field."""

from __future__ import annotations

import re
from pathlib import Path

from domainlm import checks
from domainlm.errors import DomainLMError

FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def as_form_words(message: str, fields) -> str:
    """`--max-seq-len 512 ...` -> `max seq len 512 ...` for the fields the form shows (flags are the CLI's words)."""

    def word(m: re.Match) -> str:
        name = m.group(1).replace("-", "_")
        return name.replace("_", " ") if name in fields else m.group(0)

    return FLAG.sub(word, message)


def _relative(errors: dict, home: Path) -> dict:
    """Messages name files by their path under --home, as the form shows them."""
    prefix = str(home.resolve()) + "/"
    return {k: str(v).replace(prefix, "") for k, v in errors.items()}


def finetune(cfg, errors: dict, home: Path) -> None:
    """finetune's own check (classify.checks), without waiting on a model hub."""
    from domainlm.classify.checks import check

    _, problems = check(cfg, network=False)
    for key, message in _relative(problems, home).items():
        errors.setdefault(key, message)


def pretrain(cfg, errors: dict, home: Path) -> None:
    """pretrain's own check (pretrain.checks), without the network and without reading every token id."""
    from domainlm.pretrain.checks import check

    _, problems = check(cfg, network=False, scan_ids=False)
    for key, message in _relative(problems, home).items():
        errors.setdefault(key, message)


def distill(cfg, errors: dict, home: Path) -> None:
    """distill's own check (distill.checks), without the network."""
    from domainlm.distill.checks import check

    _, problems = check(cfg, network=False)
    for key, message in _relative(problems, home).items():
        errors.setdefault(key, message)


def model_positions(model: str, max_seq_len: int, errors: dict, field: str) -> None:
    """A model (a sweep's base) against the length the cells train at: its config read, its positions checked."""
    from domainlm.interop.models import peek_config

    try:
        config = peek_config(model)
        if config is not None:
            checks.max_seq_len(config, max_seq_len, model)
    except DomainLMError as e:
        errors.setdefault("max_seq_len" if "--max-seq-len" in str(e) else field, str(e))
