"""Documents -> token ids, sentence lengths and word-start flags. Runs inside worker processes.

Word starts come from Chinese word segmentation when enabled (a token starts a word when its first character
starts a segmenter word), else from the tokenizer's own pre-tokenizer word ids. This works for any fast
tokenizer, including vocabularies without `##` continuation entries for Chinese characters (ERNIE 3.0).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import dataclass

import numpy as np

from domainlm.data import fastpath
from domainlm.data.clean import exact_key, minhash_signature, normalize_text
from domainlm.data.fastpath import CharTableTokenizer, word_firsts
from domainlm.data.readers import Document
from domainlm.data.sentences import detect_language, split_sentences


def text_backend(tokenizer_file: str):
    """The Rust tokenizer as `prepare` uses it: special-token strings in documents ("[SEP]", "[MASK]" ...) are
    tokenized as the text they are, never turned into special ids, so no special id enters a corpus."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(tokenizer_file)
    backend.encode_special_tokens = True
    return backend


def corpus_forbidden_ids(tokenizer) -> list[int]:
    """Special ids a corpus must never hold ([CLS], [SEP], [PAD], [MASK] ...): pretraining adds them itself.
    [UNK] is allowed: it is how WordPiece writes a character outside the vocabulary."""
    return sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id})


def vocab_hash(tokenizer) -> str:
    """Identifies a vocabulary: a corpus is only valid with a model whose tokenizer has the same hash."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


@dataclass
class EncodedDocument:
    ids: np.ndarray  # int64, all sentences back to back
    lengths: np.ndarray  # int64 tokens per sentence
    word_starts: np.ndarray  # bool per token
    key: bytes  # exact-duplicate digest
    signature: np.ndarray | None  # MinHash values for near-duplicate detection
    n_chars: int
    n_cut: int  # over-long sentences cut into pieces
    language: str


@dataclass
class EncodeOptions:
    tokenizer_file: str  # tokenizer.json: workers load the Rust tokenizer alone, without importing transformers
    language: str = "auto"  # auto | zh | en
    segment: bool = False
    segmenter: str = "rjieba"
    user_dict: str | None = None
    normalize: str = "NFC"
    max_sentence_tokens: int = 510
    near_dup_threshold: float = 0.8
    num_perm: int = 64


class DocumentEncoder:
    def __init__(self, options: EncodeOptions):
        self.options = options
        self.backend = text_backend(options.tokenizer_file)
        self.fast = CharTableTokenizer(self.backend) if fastpath.supports(self.backend) else None
        self.segmenter = None
        if options.segment:
            from domainlm.data.segment import Segmenter

            self.segmenter = Segmenter(options.segmenter, options.user_dict)

    def _tokenize(self, sentences: list[str]) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
        """The document as one text (sentences joined by newlines) and, per token: id, character offset in
        that text, and whether it starts a word of the tokenizer's pre-tokenizer."""
        text = "\n".join(sentences)
        if self.fast is not None:  # newlines are whitespace to a BERT-style tokenizer: one pass per document
            ((ids, offsets, first),) = self.fast.encode_batch([text])
            return text, ids, offsets, first
        ids, offsets, first, start = [], [], [], 0
        for sentence, enc in zip(sentences, self.backend.encode_batch(sentences, add_special_tokens=False)):
            ids.append(np.asarray(enc.ids, np.int64))
            offsets.append(start + np.asarray([o[0] for o in enc.offsets], np.int64))
            first.append(word_firsts(enc.word_ids))
            start += len(sentence) + 1
        return text, np.concatenate(ids), np.concatenate(offsets), np.concatenate(first)

    def encode(self, doc: Document) -> EncodedDocument | None:
        """None for a document with no text left after cleaning."""
        opts = self.options
        text = normalize_text(doc.text, opts.normalize)
        if not text:
            return None
        language = detect_language(text) if opts.language == "auto" else opts.language
        sentences = split_sentences(text, language)
        if not sentences:
            return None
        joined, ids, offsets, flags = self._tokenize(sentences)
        if not len(ids):
            return None
        if self.segmenter is not None and language == "zh":
            flags = self.segmenter.word_starts(joined)[offsets]
        sentence_starts = np.cumsum([0] + [len(s) + 1 for s in sentences[:-1]])
        sentence_of = np.searchsorted(sentence_starts, offsets, side="right") - 1
        lengths = np.bincount(sentence_of, minlength=len(sentences))
        lengths = lengths[lengths > 0]  # sentences with no tokens vanish
        # Over-long sentences are cut here, where it is visible in the stats, not dropped later.
        step = opts.max_sentence_tokens
        n_cut = int((lengths > step).sum())
        if n_cut:
            lengths = np.asarray(
                [p for n in lengths.tolist() for p in [step] * (n // step) + ([n % step] if n % step else [])]
            )
        flags = flags.copy()
        flags[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True  # a sentence (piece) starts a word
        signature = minhash_signature(text, opts.num_perm) if opts.near_dup_threshold > 0 else None
        return EncodedDocument(
            ids=ids,
            lengths=lengths.astype(np.int64),
            word_starts=flags,
            key=exact_key(text),
            signature=signature,
            n_chars=len(text),
            n_cut=n_cut,
            language=language,
        )


# Worker-process plumbing: one encoder per process, built once by the pool initializer.
_ENCODER: DocumentEncoder | None = None


def init_worker(options: EncodeOptions) -> None:
    global _ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (prepare._encode_all)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; avoid oversubscription
    _ENCODER = DocumentEncoder(options)


def encode_chunk(docs: list[Document]) -> list[EncodedDocument | None]:
    assert _ENCODER is not None, "init_worker was not called"
    return [_ENCODER.encode(d) for d in docs]
