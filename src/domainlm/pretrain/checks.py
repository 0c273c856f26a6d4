"""What `pretrain` checks before it trains, in one place: the command, the sweep's pretrain sections and the console
(at job creation, every problem under its field) all call check().

check(cfg) -> (Found, {field: message})   the corpus store, the tokenizer (--tokenizer, else the model's, else the
                                          corpus's) against the corpus's vocabulary and the model's, the model's
                                          positions against --max-seq-len, weights present (or --from-scratch),
                                          the batch arithmetic. Found holds what was read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from domainlm import checks
from domainlm.errors import DomainLMError

SPECIAL = ("cls", "sep", "mask", "pad")


@dataclass
class Found:
    corpus: object | None = None  # the first corpus (of several: see corpora)
    corpora: list | None = None
    tokenizer: object | None = None
    config: object | None = None  # the model's config
    special: dict | None = None  # the tokenizer's [CLS], [SEP], [MASK], [PAD] ids


def tokenizer_source(cfg, corpus) -> tuple[str, str]:
    """(where the tokenizer comes from, the option that names it): --tokenizer, else the model's own tokenizer files,
    else the one stored with the corpus."""
    if cfg.tokenizer:
        return cfg.tokenizer, "tokenizer"
    model_dir = Path(cfg.model)
    if any((model_dir / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json", "vocab.txt")):
        return cfg.model, "model"
    return str(Path(corpus.path) / "tokenizer"), "corpus"


def check(cfg, *, network: bool = True, processes: int = 1, scan_ids: bool = True) -> tuple[Found, dict[str, str]]:
    """Every problem of a pretraining config that shows before training, by field (`network`: False for checks that
    must not wait on a model hub; `scan_ids`: also check every token id of the corpus against the model's
    vocabulary)."""
    from domainlm.data.store import Corpus
    from domainlm.data.tokenize import vocab_hash
    from domainlm.interop.models import load_config, peek_config, weights_missing
    from domainlm.interop.tokenizer import load_fast_tokenizer
    from domainlm.pretrain import mixture

    found, errors = Found(), {}
    try:
        found.config = load_config(cfg.model) if network else peek_config(cfg.model)
    except DomainLMError as e:
        errors["model"] = str(e)
    if found.config is not None:
        try:
            checks.max_seq_len(found.config, cfg.max_seq_len, cfg.model)
        except DomainLMError as e:
            errors["max_seq_len"] = str(e)
        if not cfg.from_scratch and weights_missing(cfg.model):
            errors.setdefault(
                "from_scratch",
                f"{cfg.model} holds a config but no weights; pass --from-scratch to "
                "train from random weights, or choose a model with weights",
            )
    try:
        checks.accumulation(cfg.global_batch_size, cfg.batch_size, processes)
    except DomainLMError as e:
        errors["global_batch_size"] = str(e)
    try:
        paths = mixture.paths(cfg.corpus)
        found.corpora = [Corpus(path) for path in paths]
    except (DomainLMError, OSError) as e:
        errors["corpus"] = str(e)
        return found, errors
    found.corpus = found.corpora[0]
    source, field = tokenizer_source(cfg, found.corpus)
    try:
        found.tokenizer = load_fast_tokenizer(
            source, log=lambda *a, **k: None, flag="--tokenizer" if field == "tokenizer" else "--model"
        )
    except DomainLMError as e:
        errors.setdefault(field, str(e))
        return found, errors
    ids = {k: getattr(found.tokenizer, f"{k}_token_id") for k in SPECIAL}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        errors.setdefault(
            field, f"the tokenizer ({source}) has no {', '.join(missing)} token; an encoder tokenizer is needed"
        )
    found.special = ids
    for path, corpus in zip(paths, found.corpora):
        if vocab_hash(found.tokenizer) != corpus.meta.get("vocab_hash"):
            errors.setdefault(
                "corpus",
                f"{path} was tokenized with a different vocabulary "
                f"({corpus.meta.get('tokenizer')}) than the model's tokenizer; prepare the "
                "corpus with the model's tokenizer",
            )
    if found.config is not None:
        if found.config.vocab_size < len(found.tokenizer):
            errors.setdefault(
                "model",
                f"the tokenizer has {len(found.tokenizer)} entries but the model's vocabulary "
                f"only {found.config.vocab_size}",
            )
        elif scan_ids and not errors:
            try:  # before training, not in it
                for corpus in found.corpora:
                    corpus.check_ids(found.config.vocab_size, f"the vocabulary of --model {cfg.model}")
            except DomainLMError as e:
                errors.setdefault("corpus", str(e))
    return found, errors
