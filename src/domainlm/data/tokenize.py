"""Documents -> token ids, sentence lengths and word-start flags. Runs inside worker processes.

Word starts come from Chinese word segmentation when enabled (a token starts a word when its first character
starts a segmenter word), else from the tokenizer's own pre-tokenizer word ids. This works for any fast
tokenizer, including vocabularies without `##` continuation entries for Chinese characters (ERNIE 3.0).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from domainlm.data.clean import exact_key, minhash_signature, normalize_text
from domainlm.data.readers import Document
from domainlm.data.sentences import detect_language, split_sentences
from domainlm.errors import DomainLMError


def load_fast_tokenizer(name_or_path: str):
    """A Hugging Face fast tokenizer by name or path; a slow-only or missing tokenizer is an error."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise DomainLMError(f"tokenizer {name_or_path!r} could not be loaded: {str(e).splitlines()[0]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DomainLMError(
            f"tokenizer {name_or_path!r} is not a fast (Rust) tokenizer; domainlm needs one for offsets and "
            "word ids: convert it with `tokenizer.save_pretrained` from a fast class such as BertTokenizerFast"
        )
    return tokenizer


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
    tokenizer: str
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
        self.tokenizer = load_fast_tokenizer(options.tokenizer)
        self.backend = self.tokenizer.backend_tokenizer
        self.segmenter = None
        if options.segment:
            from domainlm.data.segment import Segmenter

            self.segmenter = Segmenter(options.segmenter, options.user_dict)

    def encode(self, doc: Document) -> EncodedDocument | None:
        """None for a document with no text left after cleaning."""
        opts = self.options
        text = normalize_text(doc.text, opts.normalize)
        if not text:
            return None
        language = detect_language(text) if opts.language == "auto" else opts.language
        sentences = split_sentences(text, language)
        encodings = self.backend.encode_batch(sentences, add_special_tokens=False)
        ids, lengths, starts, n_cut = [], [], [], 0
        for sentence, enc in zip(sentences, encodings):
            if not enc.ids:
                continue
            sentence_ids = np.asarray(enc.ids, dtype=np.int64)
            if self.segmenter is not None and language == "zh":
                char_starts = self.segmenter.word_starts(sentence)
                flags = char_starts[np.fromiter((s for s, _ in enc.offsets), dtype=np.int64, count=len(enc.ids))]
            else:
                word_ids = np.asarray([-1 if w is None else w for w in enc.word_ids], dtype=np.int64)
                flags = np.ones(len(word_ids), dtype=bool)
                flags[1:] = word_ids[1:] != word_ids[:-1]
            flags[0] = True
            # Over-long sentences are cut here, where it is visible in the stats, not dropped later.
            step = opts.max_sentence_tokens
            if len(sentence_ids) > step:
                n_cut += 1
                for start in range(0, len(sentence_ids), step):
                    piece = flags[start : start + step].copy()
                    piece[0] = True
                    ids.append(sentence_ids[start : start + step])
                    starts.append(piece)
                    lengths.append(len(piece))
            else:
                ids.append(sentence_ids)
                starts.append(flags)
                lengths.append(len(sentence_ids))
        if not ids:
            return None
        signature = minhash_signature(text, opts.num_perm) if opts.near_dup_threshold > 0 else None
        return EncodedDocument(
            ids=np.concatenate(ids),
            lengths=np.asarray(lengths, dtype=np.int64),
            word_starts=np.concatenate(starts),
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
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; avoid oversubscription
    _ENCODER = DocumentEncoder(options)


def encode_chunk(docs: list[Document]) -> list[EncodedDocument | None]:
    assert _ENCODER is not None, "init_worker was not called"
    return [_ENCODER.encode(d) for d in docs]
