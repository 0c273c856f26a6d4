"""Corpora prepared in shards: `prepare --shard I/N` on each machine over the same inputs, then `domainlm merge`.

Each machine is given every input and takes whole files of them: the files (imports first, then documents, in the
order one `prepare` reads them) are dealt largest first, each to the shard with the fewest bytes so far (ties: the
lower shard), so the shards get about equal work and every machine computes the same assignment.

A shard is a complete corpus store (it can be trained on alone: its duplicates are removed among its own files) and
keeps beside it, in <store>/shard/, what a merge needs to decide duplicates across shards exactly as one `prepare`
over all the inputs would:

    shard.json       index, count, the digest of the whole input listing (names and sizes), the inputs' fingerprint,
                     the options that shape the corpus, the files this shard took, the language names
    entries.bin      one row per document that reached the duplicate check (or was imported), in reading order:
                     input file number (int32), what this shard did with it (uint8: kept, exact or near duplicate,
                     imported), language (uint8, an index into shard.json's list), sentences cut (int32)
    keys.bin         the exact-duplicate digest of each row (16 bytes)
    signatures.bin   its MinHash values (uint32 x num_perm), when near duplicates are looked for
    dropped/         a corpus store of the documents this shard dropped as near duplicates: one prepare of all the
                     inputs may keep one of them, because near duplicates are not transitive (the document it
                     resembled may itself be dropped as a near duplicate of a document in an earlier shard)

A document dropped as an exact duplicate has no tokens kept: one prepare drops it too, whatever else happens (its
text, and so its signature, is the earlier one's; that one was kept, or dropped with a query that can only find more
as documents are added).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domainlm.data.store import Corpus, CorpusWriter
from domainlm.errors import DomainLMError

FOLDER = "shard"
KEPT, EXACT, NEAR, IMPORTED = 0, 1, 2, 3
FATES = {"kept": KEPT, "exact": EXACT, "near": NEAR, "imported": IMPORTED}
ENTRY = np.dtype([("file", "<i4"), ("fate", "u1"), ("language", "u1"), ("cut", "<i4")])
KEY_BYTES = 16


def parse(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N), 1 <= I <= N."""
    index, _, count = str(text).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = 0
    if not (1 <= i <= n):
        raise DomainLMError(f"--shard {text!r}: expected I/N with 1 <= I <= N, e.g. 2/4 (the second of four shards)")
    return i, n


def assign(sizes: list[int], count: int) -> list[int]:
    """The shard (1..count) of each file: largest first to the shard with the fewest bytes so far."""
    loads = [(0, shard) for shard in range(1, count + 1)]
    heapq.heapify(loads)
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, shard = heapq.heappop(loads)
        out[i] = shard
        heapq.heappush(loads, (load + sizes[i], shard))
    return out


def listing(paths: list[Path]) -> str:
    """The input listing as every machine sees it: positions, file names and sizes (not where they are mounted)."""
    items = [(p.name, p.stat().st_size) for p in paths]
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def store_fingerprint(inputs_fingerprint: str, shard: tuple[int, int]) -> str:
    """A shard's own fingerprint (so that another shard of the same inputs is not taken for it)."""
    return hashlib.sha256(f"{inputs_fingerprint} shard {shard[0]}/{shard[1]}".encode()).hexdigest()[:16]


@dataclass
class Plan:
    """This shard's share of the inputs: for imports and documents, the files it reads and their input numbers."""

    imports: list[Path]
    import_numbers: list[int]
    files: list[Path]
    file_numbers: list[int]
    total: int  # input files in all
    listing: str


def plan(imports: list[Path], files: list[Path], shard: tuple[int, int]) -> Plan:
    everything = imports + files
    owner = assign([p.stat().st_size for p in everything], shard[1])
    mine = [i for i, s in enumerate(owner) if s == shard[0]]
    if not mine:
        raise DomainLMError(
            f"--shard {shard[0]}/{shard[1]}: no input file falls to this shard ({len(everything)} "
            f"file(s) for {shard[1]} shards; a shard takes whole files): use at most {len(everything)} shards"
        )
    n_imports = len(imports)
    return Plan(
        [everything[i] for i in mine if i < n_imports],
        [i for i in mine if i < n_imports],
        [everything[i] for i in mine if i >= n_imports],
        [i for i in mine if i >= n_imports],
        len(everything),
        listing(everything),
    )


class LedgerWriter:
    """Streams a shard's ledger into <store>/shard/ while prepare writes the store."""

    def __init__(self, folder: Path, vocab_size: int, num_perm: int, near: bool):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.num_perm, self.near = num_perm, near
        self._entries = open(folder / "entries.bin", "wb")
        self._keys = open(folder / "keys.bin", "wb")
        self._signatures = open(folder / "signatures.bin", "wb") if near else None
        self.dropped = CorpusWriter(folder / "dropped", vocab_size)
        self.languages: list[str] = []
        self.n = 0

    def add(self, file: int, fate: str, enc=None) -> None:
        """One document: its input file number, what this shard did with it, and its encoding (None: imported)."""
        row = np.zeros(1, ENTRY)
        row["file"], row["fate"] = file, FATES[fate]
        key, signature = b"\0" * KEY_BYTES, None
        if enc is not None:
            if enc.language not in self.languages:
                self.languages.append(enc.language)
            row["language"], row["cut"] = self.languages.index(enc.language), enc.n_cut
            key, signature = enc.key, enc.signature
        if len(key) != KEY_BYTES:
            raise ValueError("exact-duplicate keys are 16 bytes")
        self._entries.write(row.tobytes())
        self._keys.write(key)
        if self._signatures is not None:
            values = np.zeros(self.num_perm, "<u4") if signature is None else np.asarray(signature).astype("<u4")
            self._signatures.write(values.tobytes())
        if fate == "near":
            self.dropped.add(enc.ids, enc.lengths, enc.word_starts)
        self.n += 1

    def close(self, info: dict) -> None:
        for f in (self._entries, self._keys, self._signatures):
            if f is not None:
                f.flush()
                f.close()
        self.dropped.close({"tokenizer": info.get("tokenizer"), "vocab_hash": info.get("vocab_hash")})
        (self.folder / "shard.json").write_text(
            json.dumps(
                {**info, "entries": self.n, "num_perm": self.num_perm, "near": self.near, "languages": self.languages},
                indent=1,
                ensure_ascii=False,
            ),
            encoding="utf-8",
        )


class Ledger:
    """The read side: a shard store's ledger, memory-mapped."""

    def __init__(self, store: Corpus):
        self.store = store
        folder = store.path / FOLDER
        try:
            self.info = json.loads((folder / "shard.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DomainLMError(
                f"{store.path}: its shard ledger ({folder / 'shard.json'}) is missing or damaged ({e}); "
                "prepare the shard again"
            ) from None
        n = int(self.info["entries"])
        self.entries = _map(folder / "entries.bin", ENTRY, n)
        self.keys = _map(folder / "keys.bin", np.dtype(("u1", KEY_BYTES)), n)  # [n, 16]
        self.signatures = (
            _map(folder / "signatures.bin", np.dtype("<u4"), n * self.info["num_perm"]).reshape(
                n, self.info["num_perm"]
            )
            if self.info["near"]
            else None
        )
        self.dropped = Corpus(folder / "dropped")
        self.index, self.count = int(self.info["index"]), int(self.info["count"])


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    size = path.stat().st_size if path.is_file() else -1
    if size != dtype.itemsize * count:
        raise DomainLMError(
            f"{path}: {size} bytes, expected {dtype.itemsize * count}; the shard is damaged, prepare it again"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
