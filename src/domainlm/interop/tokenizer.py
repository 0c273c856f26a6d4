"""Loading a fast tokenizer from wherever an encoder comes from: a hub name, an HF folder, a folder holding only
vocab.txt (bert-base-chinese, Chinese RoBERTa-wwm, ERNIE), or a PaddleNLP tokenizer folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from domainlm.errors import DomainLMError

# tokenizer classes that read vocab.txt as a BERT WordPiece vocabulary (HF and PaddleNLP names)
WORDPIECE_CLASSES = {
    "BertTokenizer",
    "BertTokenizerFast",
    "ErnieTokenizer",
    "ErnieTokenizerFast",
    "ErnieTinyTokenizer",
    "RobertaChineseTokenizer",
    "BertChineseTokenizer",
    "",
}


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def wordpiece_from_vocab(folder: Path, log=_log_stderr):
    """A fast BERT WordPiece tokenizer from a folder's vocab.txt (how bert-base-chinese, Chinese RoBERTa-wwm
    and ERNIE vocabularies are distributed, and PaddleNLP's tokenizer folders). Options come from
    tokenizer_config.json where it has them, else BERT's: lower-casing with accents stripped, every CJK
    character its own word, whitespace and punctuation splits, [UNK]/[CLS]/[SEP]/[PAD]/[MASK]. Literal
    "[SEP]", "[MASK]" ... in text become special ids, as with PaddleNLP's from_pretrained tokenizers."""
    import inspect

    from transformers import BertTokenizerFast

    config_path = folder / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DomainLMError(f"{config_path}: not readable JSON ({e})") from None
    options = {
        k: config[k]
        for k in (
            "do_lower_case",
            "tokenize_chinese_chars",
            "strip_accents",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        )
        if isinstance(config.get(k), (str, bool))
    }
    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    specials = {options.get(f"{k}_token", f"[{k.upper()}]") for k in ("unk", "sep", "pad", "cls", "mask")}
    absent = sorted(specials - set(vocab))
    if absent:
        raise DomainLMError(
            f"{folder / 'vocab.txt'}: special tokens {', '.join(absent)} are not in the vocabulary; "
            "an encoder tokenizer needs them (set other names in tokenizer_config.json)"
        )
    if isinstance(config.get("model_max_length"), int):
        options["model_max_length"] = config["model_max_length"]
    key = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tokenizer = BertTokenizerFast(**{key: str(folder / "vocab.txt")}, **options)
    source = f"{config.get('tokenizer_class')} settings from tokenizer_config.json" if config else "BERT's defaults"
    log(
        f"tokenizer: {folder} has vocab.txt but no tokenizer.json; read it as a BERT WordPiece vocabulary "
        f"({len(tokenizer)} entries; lower-case {options.get('do_lower_case', True)}; CJK characters split one by one; "
        f"{source})"
    )
    return tokenizer


def load_fast_tokenizer(name_or_path: str, log=_log_stderr, flag: str = "--tokenizer"):
    """A Hugging Face fast tokenizer from a name, an HF folder, a folder holding only vocab.txt, or a
    PaddleNLP tokenizer folder; a slow-only or missing tokenizer is an error."""
    from transformers import AutoTokenizer

    from domainlm.interop.names import hub_kwargs
    from domainlm.interop.resolve import hub_error, resolve_source

    source = resolve_source(name_or_path, flag, log=log)
    folder = Path(source)
    tokenizer = None
    if folder.is_dir() and not (folder / "tokenizer.json").is_file() and (folder / "vocab.txt").is_file():
        config_path = folder / "tokenizer_config.json"
        cls = ""
        if config_path.is_file():
            try:
                cls = str(json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class") or "")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                cls = ""
        if cls in WORDPIECE_CLASSES:
            tokenizer = wordpiece_from_vocab(folder, log=log)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs())
        except (OSError, ValueError, ImportError) as e:
            if not folder.is_dir():
                raise hub_error(source, flag, e) from None
                # the whole message on one line: its advice ("You need sentencepiece ...") is often on the last line
                raise DomainLMError(
                    f"tokenizer {name_or_path!r} could not be loaded: {' '.join(str(e).split())}"
                ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise DomainLMError(
            f"tokenizer {name_or_path!r} is not a fast (Rust) tokenizer; domainlm needs one for offsets and "
            "word ids: convert it with `tokenizer.save_pretrained` from a fast class such as BertTokenizerFast"
        )
    return tokenizer
