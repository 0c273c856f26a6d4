"""The corpus store: token ids, word starts, sentence and document boundaries, memory-mapped.

Format `domainlm-corpus` version 1 (one folder, all arrays raw little-endian, see meta.json):
    tokens.bin            uint16 (vocab <= 65535) or int32 token ids, all sentences back to back
    words.bin             uint8 per token: 1 where the token starts a word (whole-word masking)
    sentences.bin         int64, n_sentences + 1 token offsets (sentence i = tokens[s[i]:s[i+1]])
    documents.bin         int64, n_documents + 1 sentence offsets (document j = sentences d[j]..d[j+1])
    meta.json             format, version, dtype, vocab size and hash, tokenizer, counts, the largest token id
    stats.json            corpus statistics from `prepare`
Arrays are streamed to disk while writing, so memory stays flat whatever the corpus size. Reading maps them: a
process holds the pages it touches, so nothing at start-up reads a whole array (the largest id is in meta.json;
stores written before it was are scanned with plain reads, which leave no pages in the process).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from domainlm.errors import DomainLMError

FORMAT = "domainlm-corpus"
VERSION = 1
FILES = ("tokens.bin", "words.bin", "sentences.bin", "documents.bin", "meta.json")
SCAN_TOKENS = 1 << 22  # tokens per read when a store without max_token_id is scanned


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


class CorpusWriter:
    """Appends documents to a folder; `close(meta)` writes meta.json last, which marks the store complete."""

    def __init__(self, folder: str | Path, vocab_size: int, buffer_tokens: int = 1 << 20, forbidden_ids=()):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.vocab_size = vocab_size
        # special ids ([CLS], [SEP], [MASK], [PAD]) are added by pretraining; one inside a sentence would be
        # taken for structure, so the store refuses them (see tokenize.corpus_forbidden_ids)
        self.forbidden = np.zeros(vocab_size, dtype=bool)
        self.forbidden[[i for i in forbidden_ids if 0 <= i < vocab_size]] = True
        self.dtype = token_dtype(vocab_size)
        self._tokens = open(self.folder / "tokens.bin", "wb")
        self._words = open(self.folder / "words.bin", "wb")
        self._sentences = open(self.folder / "sentences.bin", "wb")
        self._documents = open(self.folder / "documents.bin", "wb")
        self.n_tokens = self.n_sentences = self.n_documents = 0
        self.max_id = -1
        self._sentences.write(struct.pack("<q", 0))
        self._documents.write(struct.pack("<q", 0))

    def add(self, ids: np.ndarray, lengths: np.ndarray, word_starts: np.ndarray) -> None:
        if len(lengths) == 0:
            return
        top = int(ids.max()) if ids.size else -1
        if ids.size and (ids.min() < 0 or top >= self.vocab_size):
            raise DomainLMError(f"token id {top} is outside the vocabulary of {self.vocab_size} entries")
        self.max_id = max(self.max_id, top)
        bad = np.flatnonzero(self.forbidden[ids])
        if bad.size:
            raise DomainLMError(
                f"special token id {int(ids[bad[0]])} at position {int(bad[0])} of document {self.n_documents + 1}: "
                "a corpus must hold text tokens only (special tokens are added by pretraining)"
            )
        if int(lengths.sum()) != len(ids) or len(word_starts) != len(ids):
            raise ValueError("lengths and word_starts must match ids")
        self._tokens.write(ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._words.write(word_starts.astype(np.uint8, copy=False).tobytes())
        offsets = self.n_tokens + np.cumsum(lengths, dtype=np.int64)
        self._sentences.write(offsets.astype("<i8").tobytes())
        self.n_tokens += len(ids)
        self.n_sentences += len(lengths)
        self.n_documents += 1
        self._documents.write(struct.pack("<q", self.n_sentences))

    def copy_documents(self, corpus: Corpus, first: int, end: int, chunk_tokens: int = 1 << 24) -> None:
        """Documents [first, end) of another store of the same vocabulary, appended in bulk, a chunk at a time (the
        store checked them when it was written; `add` checks one document)."""
        if end <= first:
            return
        s0, s1 = int(corpus.document_offsets[first]), int(corpus.document_offsets[end])
        t0, t1 = int(corpus.sentence_offsets[s0]), int(corpus.sentence_offsets[s1])
        dtype = self.dtype.newbyteorder("<")
        for a in range(t0, t1, chunk_tokens):
            b = min(a + chunk_tokens, t1)
            tokens = np.asarray(corpus.tokens[a:b])
            self.max_id = max(self.max_id, int(tokens.max()))
            self._tokens.write(tokens.astype(dtype, copy=False).tobytes())
            self._words.write(np.asarray(corpus.words[a:b]).tobytes())
        for a in range(s0 + 1, s1 + 1, chunk_tokens):
            b = min(a + chunk_tokens, s1 + 1)
            self._sentences.write(
                (np.asarray(corpus.sentence_offsets[a:b]) - t0 + self.n_tokens).astype("<i8").tobytes()
            )
        for a in range(first + 1, end + 1, chunk_tokens):
            b = min(a + chunk_tokens, end + 1)
            self._documents.write(
                (np.asarray(corpus.document_offsets[a:b]) - s0 + self.n_sentences).astype("<i8").tobytes()
            )
        self.n_tokens += t1 - t0
        self.n_sentences += s1 - s0
        self.n_documents += end - first

    def close(self, meta: dict) -> dict:
        for f in (self._tokens, self._words, self._sentences, self._documents):
            f.flush()
            f.close()
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "n_documents": self.n_documents,
            "n_sentences": self.n_sentences,
            "n_tokens": self.n_tokens,
            "max_token_id": self.max_id,  # what check_ids needs, without reading tokens.bin
            **meta,
        }
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        return meta


class Corpus:
    """Read side: memory-mapped arrays; pickles by path, so DataLoader workers reopen rather than copy."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not self.path.is_dir() or not meta_path.is_file():
            raise DomainLMError(f"{self.path} is not a corpus store (no meta.json); create one with `domainlm prepare`")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DomainLMError(f"{meta_path}: damaged ({e})") from None
        if self.meta.get("format") != FORMAT:
            raise DomainLMError(f"{self.path} is not a domainlm corpus store (format {self.meta.get('format')!r})")
        if self.meta.get("version") != VERSION:
            raise DomainLMError(
                f"{self.path}: corpus format version {self.meta.get('version')} is not supported "
                f"(this domainlm reads version {VERSION}); prepare the corpus again"
            )
        missing = [f for f in FILES if not (self.path / f).is_file()]
        if missing:
            raise DomainLMError(f"{self.path}: corpus store is incomplete, missing {', '.join(missing)}")
        self._open()

    def _open(self) -> None:
        m = self.meta
        self.tokens = self._map("tokens.bin", np.dtype(m["dtype"]).newbyteorder("<"), m["n_tokens"])
        self.words = self._map("words.bin", np.uint8, m["n_tokens"])
        self.sentence_offsets = self._map("sentences.bin", "<i8", m["n_sentences"] + 1)
        self.document_offsets = self._map("documents.bin", "<i8", m["n_documents"] + 1)

    def _map(self, name: str, dtype, count: int) -> np.ndarray:
        path = self.path / name
        expected = np.dtype(dtype).itemsize * count
        if path.stat().st_size != expected:
            raise DomainLMError(
                f"{path}: size {path.stat().st_size} bytes, expected {expected}; the store is damaged, prepare it again"
            )
        if count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    @property
    def n_documents(self) -> int:
        return int(self.meta["n_documents"])

    @property
    def n_sentences(self) -> int:
        return int(self.meta["n_sentences"])

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    def max_token_id(self) -> int:
        """The largest token id (-1 for no tokens): from meta.json, else (a store written before meta.json held it)
        one pass over tokens.bin with plain reads into one buffer, so that the process holds none of its pages."""
        top = self.meta.get("max_token_id")
        if isinstance(top, int) and not isinstance(top, bool):
            return top
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        buffer = np.empty(min(self.n_tokens, SCAN_TOKENS), dtype=dtype)
        top = -1
        with open(self.path / "tokens.bin", "rb", buffering=0) as f:
            while n := f.readinto(memoryview(buffer).cast("B")) // dtype.itemsize:
                top = max(top, int(buffer[:n].max()))
        return top

    def check_ids(self, vocab_size: int, what: str) -> None:
        """Every token id below `vocab_size`, else an error naming both sizes: an id beyond a model's embeddings or
        a tokenizer's vocabulary fails deep inside otherwise."""
        top = self.max_token_id()
        if top >= vocab_size:
            raise DomainLMError(
                f"{self.path}: token id {top} is beyond {what} ({vocab_size} entries); "
                "prepare the corpus with the model's tokenizer"
            )

    def read_sentence_offsets(self, indices) -> np.ndarray:
        """sentence_offsets[indices] read with plain reads, one 8-byte read each: for scattered offsets of a large
        store at start-up (a few per held-out document), where touching them through the map would leave most of
        sentences.bin's pages in the process."""
        out = np.empty(len(indices), dtype=np.int64)
        with open(self.path / "sentences.bin", "rb", buffering=0) as f:
            fd = f.fileno()
            for i, k in enumerate(np.asarray(indices, dtype=np.int64).tolist()):
                out[i] = int.from_bytes(os.pread(fd, 8, 8 * k), "little", signed=True)
        return out

    def sentence_lengths(self) -> np.ndarray:
        return np.diff(self.sentence_offsets)

    def document_sentences(self, doc: int) -> range:
        return range(int(self.document_offsets[doc]), int(self.document_offsets[doc + 1]))

    def sentence(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.sentence_offsets[i] : self.sentence_offsets[i + 1]], dtype=np.int64)

    def sentence_words(self, i: int) -> np.ndarray:
        return np.asarray(self.words[self.sentence_offsets[i] : self.sentence_offsets[i + 1]], dtype=bool)

    def span(self, first_sentence: int, end_sentence: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and word starts of sentences [first, end) in one slice."""
        a, b = self.sentence_offsets[first_sentence], self.sentence_offsets[end_sentence]
        return np.asarray(self.tokens[a:b], dtype=np.int64), np.asarray(self.words[a:b], dtype=bool)


# ---- imports of corpora prepared by other tools ---------------------------------------------------------


def find_imports(folder: Path) -> list[Path]:
    """Corpora of other tools in a folder: PaddleNLP `<prefix>_ids.npy` (+ `_idx.npz`) and Megatron `.bin`
    files that have their `.idx` beside them."""
    found = [p for p in folder.rglob("*_ids.npy") if p.is_file()]
    found += [p for p in folder.rglob("*.bin") if p.is_file() and p.with_suffix(".idx").is_file()]
    return sorted(found)


def read_paddlenlp(ids_path: Path):
    """PaddleNLP `create_pretraining_data.py` output: `<prefix>_ids.npy` + `<prefix>_idx.npz` (lens, docs).

    Yields (ids, sentence lengths) per document. `docs` holds cumulative sentence counts starting at 0.
    """
    name = ids_path.name
    if not name.endswith("_ids.npy"):
        raise DomainLMError(f"{ids_path}: a PaddleNLP corpus is named <prefix>_ids.npy")
    idx_path = ids_path.with_name(name[: -len("_ids.npy")] + "_idx.npz")
    if not idx_path.is_file():
        raise DomainLMError(f"{ids_path}: its index {idx_path.name} is missing beside it")
    try:
        ids = np.load(ids_path, mmap_mode="r", allow_pickle=False)
        index = np.load(idx_path, allow_pickle=False)
        lens, docs = index["lens"].astype(np.int64), index["docs"].astype(np.int64)
    except (OSError, ValueError, KeyError) as e:
        raise DomainLMError(f"{ids_path}: not a readable PaddleNLP corpus ({e})") from None
    if int(lens.sum()) != len(ids) or docs[0] != 0 or docs[-1] != len(lens):
        raise DomainLMError(f"{idx_path}: lens/docs do not match {ids_path.name} ({len(ids)} tokens)")
    offsets = np.concatenate([[0], np.cumsum(lens)])
    for j in range(len(docs) - 1):
        s0, s1 = docs[j], docs[j + 1]
        yield np.asarray(ids[offsets[s0] : offsets[s1]], dtype=np.int64), lens[s0:s1]


_MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
_MEGATRON_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


def read_megatron(bin_path: Path):
    """Megatron-LM indexed dataset (`.bin` + `.idx`), one sequence per sentence as its BERT preprocessing
    writes it; the document index gives sentence boundaries. Yields (ids, sentence lengths) per document."""
    idx_path = bin_path.with_suffix(".idx")
    if not idx_path.is_file():
        raise DomainLMError(f"{bin_path}: its index {idx_path.name} is missing beside it")
    with open(idx_path, "rb") as f:
        if f.read(9) != _MEGATRON_MAGIC:
            raise DomainLMError(f"{idx_path}: not a Megatron index (bad magic bytes)")
        (version,) = struct.unpack("<Q", f.read(8))
        (code,) = struct.unpack("<B", f.read(1))
        n_seq, n_doc = struct.unpack("<QQ", f.read(16))
        header = f.tell()
    if version != 1 or code not in _MEGATRON_DTYPES:
        raise DomainLMError(f"{idx_path}: unsupported Megatron index version {version} or dtype code {code}")
    lens = np.memmap(idx_path, dtype="<i4", mode="r", offset=header, shape=(n_seq,)).astype(np.int64)
    docs = np.memmap(idx_path, dtype="<i8", mode="r", offset=header + 12 * n_seq, shape=(n_doc,)).astype(np.int64)
    tokens = np.memmap(bin_path, dtype=_MEGATRON_DTYPES[code], mode="r")
    if int(lens.sum()) != len(tokens):
        raise DomainLMError(f"{bin_path}: {len(tokens)} tokens, but the index describes {int(lens.sum())}")
    offsets = np.concatenate([[0], np.cumsum(lens)])
    for j in range(len(docs) - 1):
        s0, s1 = docs[j], docs[j + 1]
        yield np.asarray(tokens[offsets[s0] : offsets[s1]], dtype=np.int64), lens[s0:s1]


def write_megatron(prefix: str | Path, documents: list[list[list[int]]]) -> None:
    """Write a small Megatron indexed dataset (used by tests and for round-trip checks)."""
    prefix = Path(prefix)
    lens = [len(s) for doc in documents for s in doc]
    flat = np.asarray([t for doc in documents for s in doc for t in s], dtype=np.int32)
    flat.tofile(prefix.with_suffix(".bin"))
    pointers = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype("<i8") * 4
    docs = np.concatenate([[0], np.cumsum([len(d) for d in documents])]).astype("<i8")
    with open(prefix.with_suffix(".idx"), "wb") as f:
        f.write(_MEGATRON_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", 4))
        f.write(struct.pack("<QQ", len(lens), len(docs)))
        f.write(np.asarray(lens, dtype="<i4").tobytes() + pointers.tobytes() + docs.tobytes())
