"""Checks a command makes at start-up, made when the job is created instead: the model's positions against the
length, the tokenizer's vocabulary against the corpus and the model, the label sets of the data files, the
global batch. Each check reads configs, vocabularies and data files only (no weights are loaded), so a job
that would fail in its first seconds is refused at once with every reason, each under its field."""

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


def _model_config(value: str, errors: dict, field: str = "model"):
    """The model's config from its folder or the local hub cache; a hub name not downloaded yet is left to the job
    (creating a job must not wait on the network)."""
    from huggingface_hub import try_to_load_from_cache

    from domainlm.interop.resolve import resolve_source
    from domainlm.pretrain.model import load_config

    try:
        source = resolve_source(value, "--model", log=lambda *a, **k: None)
        if not Path(source).is_dir() and not isinstance(try_to_load_from_cache(source, "config.json"), str):
            return None
        return load_config(value)
    except DomainLMError as e:
        errors.setdefault(field, str(e))
    except Exception as e:  # noqa: BLE001 - a broken config.json: say so under the field, not as a 500
        errors.setdefault(field, f"{value}: the model's config could not be read ({type(e).__name__}: {e})")
    return None


def _positions(config, value: int, model: str, errors: dict) -> None:
    limit = checks.position_limit(config)
    if limit is not None and value > limit:
        errors.setdefault("max_seq_len", f"--max-seq-len {value} exceeds what the model {Path(model).name} can take "
                                         f"({limit} positions); use {limit} or less")


def pretrain(cfg, errors: dict) -> None:
    from domainlm.data.store import Corpus
    from domainlm.data.tokenize import vocab_hash
    from domainlm.interop.tokenizer import load_fast_tokenizer
    from domainlm.pretrain.model import has_weights

    config = _model_config(cfg.model, errors)
    if config is not None:
        _positions(config, cfg.max_seq_len, cfg.model, errors)
        local = Path(cfg.model)
        from domainlm.interop.paddle import is_paddle_folder

        if local.is_dir() and not cfg.from_scratch and not has_weights(local) and not is_paddle_folder(local):
            errors.setdefault("from_scratch", f"{local.name} holds a config but no weights: tick from scratch to train "
                                              "from random weights, or choose a model with weights")
    if cfg.global_batch_size and cfg.global_batch_size % cfg.batch_size:
        errors.setdefault("global_batch_size", f"--global-batch-size {cfg.global_batch_size} is not a multiple of "
                                               f"--batch-size {cfg.batch_size}")
    try:
        corpus = Corpus(cfg.corpus)
    except (DomainLMError, OSError) as e:
        errors.setdefault("corpus", str(e))
        return
    source, field = (cfg.tokenizer, "tokenizer") if cfg.tokenizer else (cfg.model, "model")
    model_dir = Path(cfg.model)
    if not cfg.tokenizer and not ((model_dir / "tokenizer_config.json").is_file() or (model_dir / "tokenizer.json").is_file()
                                  or (model_dir / "vocab.txt").is_file()):
        source, field = str(corpus.path / "tokenizer"), "corpus"
    try:
        tokenizer = load_fast_tokenizer(source, log=lambda *a, **k: None)
    except DomainLMError as e:
        errors.setdefault(field, str(e))
        return
    if vocab_hash(tokenizer) != corpus.meta.get("vocab_hash"):
        errors.setdefault("corpus", f"the corpus was tokenized with another vocabulary ({corpus.meta.get('tokenizer')}) "
                                    "than the model's tokenizer: prepare it with the model's tokenizer")
    if config is not None and config.vocab_size < len(tokenizer):
        errors.setdefault("model", f"the tokenizer has {len(tokenizer)} entries but the model's vocabulary only "
                                   f"{config.vocab_size}")


def finetune(cfg, errors: dict, home: Path) -> None:
    """The data files read as `finetune` reads them, their labels against the training labels, the model's positions."""
    from domainlm.classify.data import Columns, check_labels, label_list, read_examples

    read: dict = {}
    for key in ("train", "dev", "test"):
        path = getattr(cfg, key)
        if path is None:
            continue
        try:
            read[key] = read_examples(path, Columns.of(cfg), cfg.multilabel, skip_bad=cfg.skip_bad_rows)
        except DomainLMError as e:
            errors[key] = str(e).replace(str(home.resolve()) + "/", "")
    if "train" in read:
        try:
            labels = label_list(read["train"], cfg.labels or None)
        except DomainLMError as e:
            errors.setdefault("labels", str(e).replace(str(home.resolve()) + "/", ""))
            labels = None
        for key in ("dev", "test"):
            if labels and key in read:
                try:
                    check_labels(read[key], labels)
                except DomainLMError as e:
                    errors.setdefault(key, str(e).replace(str(home.resolve()) + "/", ""))
    if cfg.model and cfg.method != "linear":
        config = _model_config(cfg.model, errors)
        if config is not None:
            _positions(config, cfg.max_seq_len, cfg.model, errors)
