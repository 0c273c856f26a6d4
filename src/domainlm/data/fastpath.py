"""An exact shortcut for BERT-style tokenizers on Chinese text.

With BERT's normaliser (`handle_chinese_chars`) and pre-tokenizer, every CJK ideograph and every punctuation
character is a word of its own, so its token does not depend on its neighbours. The Rust tokenizer still pays
for each of them as a separate word (normalise, split, offsets, WordPiece lookup): ~5 us per character, most of
`prepare`'s time on Chinese. Here those characters map through a lookup table (filled by asking the tokenizer
itself, once per distinct character), and only the runs between them (Latin words, digits, other scripts) go
to the tokenizer. The output, ids and offsets, is identical to the tokenizer's (a property-based test over
every CJK block, full-width forms, accents, emoji, control characters and special-token strings; and checked
in bench/prepare_bench.py on the benchmark corpus).

Literal special-token strings in text ("[SEP]", "[MASK]" ...) are text, not special ids: the fast path is used
only with a backend whose `encode_special_tokens` is on (see `domainlm.data.tokenize.text_backend`), where the
tokenizer itself splits them like any other text. The CJK table is the tokenizer's own (data/cjk.py).
"""

from __future__ import annotations

import json
import unicodedata

import numpy as np

from domainlm.data.cjk import is_cjk

_UNKNOWN, _NOT_ISOLATED = -2, -1


def word_firsts(word_ids) -> np.ndarray:
    """True where the pre-tokenizer's word id changes: the token starts a word."""
    words = np.asarray([-1 if w is None else w for w in word_ids], dtype=np.int64)
    first = np.ones(len(words), dtype=bool)
    first[1:] = words[1:] != words[:-1]
    return first


def _isolated(cp: int) -> bool:
    """A character BERT's normaliser and pre-tokenizer always make a word of its own."""
    if is_cjk(cp):
        return True
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(chr(cp)).startswith("P")


def supports(backend) -> bool:
    """True for a WordPiece tokenizer with BERT's normaliser (Chinese chars isolated) and pre-tokenizer, no
    added non-special tokens (those are matched across character boundaries before pre-tokenization), and
    special tokens encoded as text (else "[SEP]" in text would be one special id there, three pieces here)."""
    if not getattr(backend, "encode_special_tokens", False):
        return False
    spec = json.loads(backend.to_str())
    normalizer, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    added = [t for t in spec.get("added_tokens") or [] if not t.get("special")]
    return (
        not added
        and spec.get("model", {}).get("type") == "WordPiece"
        and normalizer.get("type") == "BertNormalizer"
        and normalizer.get("handle_chinese_chars") is True
        and pre.get("type") == "BertPreTokenizer"
    )


class CharTableTokenizer:
    """encode_batch(sentences) -> list of (ids, start offsets, word starts), equal to backend.encode_batch's
    (word starts: where the pre-tokenizer's word id changes)."""

    def __init__(self, backend):
        self.backend = backend
        self.table = np.full(0x110000, _UNKNOWN, dtype=np.int32)

    def _learn(self, codes: np.ndarray) -> None:
        for cp in np.unique(codes[self.table[codes] == _UNKNOWN]).tolist():
            if _isolated(cp):
                ids = self.backend.encode(chr(cp), add_special_tokens=False).ids
                # a character the normaliser drops or expands is left to the tokenizer
                self.table[cp] = ids[0] if len(ids) == 1 else _NOT_ISOLATED
            else:
                self.table[cp] = _NOT_ISOLATED

    def encode_batch(self, sentences: list[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        encoded = [np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.int64) for s in sentences]
        if encoded:
            self._learn(np.concatenate(encoded))
        runs, where, table_ids = [], [], []  # runs: the stretches between table characters, tokenized in one batch
        for i, (s, codes) in enumerate(zip(sentences, encoded)):
            ids = self.table[codes]
            other = ids < 0
            edges = np.flatnonzero(np.diff(np.concatenate([[0], other.view(np.int8), [0]])))
            table_ids.append(ids)
            for a, b in zip(edges[::2], edges[1::2]):
                runs.append(s[a:b])
                where.append((i, int(a)))
        run_encodings = self.backend.encode_batch(runs, add_special_tokens=False) if runs else []
        pieces: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in sentences]
        for (i, start), enc in zip(where, run_encodings):
            if enc.ids:
                offsets = start + np.asarray([o[0] for o in enc.offsets], np.int64)
                pieces[i].append((np.asarray(enc.ids, np.int64), offsets, word_firsts(enc.word_ids)))
        out = []
        for ids, extra in zip(table_ids, pieces):
            keep = ids >= 0
            pos = np.flatnonzero(keep)
            tok = ids[keep].astype(np.int64)
            if not extra:
                out.append((tok, pos, np.ones(len(tok), dtype=bool)))
                continue
            pos = np.concatenate([pos] + [p[1] for p in extra])
            tok = np.concatenate([tok] + [p[0] for p in extra])
            first = np.concatenate([np.ones(int(keep.sum()), dtype=bool)] + [p[2] for p in extra])
            order = np.argsort(pos, kind="stable")
            out.append((tok[order], pos[order], first[order]))
        return out
