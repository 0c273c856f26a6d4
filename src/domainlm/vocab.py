"""Train a BERT-style WordPiece tokenizer from text (for models trained from scratch, the demo and tests)."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8000, lowercase: bool = True):
    """Chinese characters become single tokens (BERT's pre-tokenizer), Latin words WordPiece pieces.

    Returns the saved BertTokenizerFast; `AutoTokenizer.from_pretrained(out_dir)` loads it.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        do_lower_case=lowercase,
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def read_terms(path: str | Path) -> list[str]:
    """One new token per line (blank lines and `#` comments ignored); UTF-8, or UTF-16 with its byte order mark."""
    from domainlm.errors import DomainLMError
    from domainlm.files import input_file

    p = Path(path)
    raw = input_file(p, "--tokens").read_bytes()
    try:
        text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DomainLMError(f"--tokens {p}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    terms = []
    for n, line in enumerate(text.splitlines(), 1):
        term = line.strip()
        if not term or term.startswith("#"):
            continue
        if len(term.split()) > 1:  # a tokenizer splits at whitespace first: such a token would never match
            raise DomainLMError(
                f"--tokens {p}, line {n}: {term!r} contains a space; one token per line, without spaces"
            )
        terms.append(term)
    if not terms:
        raise DomainLMError(f"--tokens {p} lists no tokens (blank lines and # comments are skipped); nothing to add")
    return terms


def extend_vocabulary(model: str, terms: list[str], out: str | Path, overwrite: bool = False) -> dict:
    """Add domain tokens to a model's tokenizer and embeddings; each new row starts as the mean of the rows
    of the pieces the old tokenizer split the term into, so the model starts where it was, not at noise.

    Prepare the corpus again with the new tokenizer afterwards (its ids change): `prepare` checks the store's
    token dtype (uint16 / int32) against the new vocabulary size, and `pretrain` the vocabulary hash.
    """
    from domainlm import outputs
    from domainlm.errors import DomainLMError
    from domainlm.interop.paddle import convert, is_paddle_folder

    if Path(model).exists() and outputs.inside(model, out):
        raise DomainLMError(
            f"--out {out} is (or contains) --model {model}: it would rewrite the input model; choose a new folder"
        )
    with outputs.run_folder(
        out, "extend-vocab", replace=True, overwrite=overwrite, models={"--model": model}
    ) as target:
        target.begin()  # nothing in --out unless the extended model is complete
        with tempfile.TemporaryDirectory() as tmp:
            if is_paddle_folder(model):  # converted first, like every other --model (the user's folder is only read)
                convert(model, Path(tmp) / "hf", log=lambda *a: print(*a, file=sys.stderr))
                model = str(Path(tmp) / "hf")
            with target.writing():
                return _extend(model, terms, target.root())


def _extend(model: str, terms: list[str], out: Path) -> dict:
    import torch
    from transformers import AutoModelForPreTraining

    from domainlm.errors import DomainLMError
    from domainlm.interop.tokenizer import load_fast_tokenizer

    tokenizer = load_fast_tokenizer(model, flag="--model")
    hf = AutoModelForPreTraining.from_pretrained(model)
    vocab = tokenizer.get_vocab()
    new = list(dict.fromkeys(t for t in terms if t not in vocab))
    pieces = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in new}
    empty = [t for t, ids in pieces.items() if not ids]
    if empty:
        raise DomainLMError(f"these terms tokenize to nothing and cannot be added: {', '.join(empty[:5])}")
    old_size = hf.get_input_embeddings().weight.shape[0]
    from tokenizers import AddedToken

    # normalized=False: match the raw text; BERT's normaliser would first space out Chinese characters
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in new])
    hf.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set from their pieces below
    with torch.no_grad():
        emb = hf.get_input_embeddings().weight
        for t in new:
            emb[tokenizer.convert_tokens_to_ids(t)] = emb[pieces[t]].mean(dim=0)
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "added": len(new),
        "already_present": len(terms) - len(new),
        "vocab_size": len(tokenizer),
        "old_embeddings": old_size,
    }
