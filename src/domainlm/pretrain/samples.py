"""Corpus split and the sample index: runs of consecutive sentences of one document, cached on disk.

A split is a set of sentence ranges: whole documents, or, when the corpus has too few documents for the
requested ratios, held-out blocks of consecutive sentences inside documents (see `split_corpus`).
A sample is (first sentence, end sentence) inside one range. The index is built once per parameter set with
numpy, advancing every range at once (one numpy step per sample *position*, not per sentence), and does not
depend on max_steps: the order in which samples are drawn is a per-epoch permutation computed from the seed.
Index and permutations are `.npy` files in `<corpus>/cache`, memory-mapped: processes and DataLoader workers
share their pages instead of each holding a copy, and start-up memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from domainlm.data.store import Corpus
from domainlm.errors import DomainLMError

SPLITS = ("train", "valid", "test")
SHARED_ORDER_MIN = 1 << 16  # samples; below this a per-process permutation costs less than a file


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0 or parts[0] <= 0:
        raise DomainLMError(f"--split {text!r}: expected three ratios train,valid,test such as 98,1,1")
    total = sum(parts)
    return tuple(p / total for p in parts)  # type: ignore[return-value]


def _eval_counts(n: int, ratios: tuple[float, float, float]) -> tuple[int, int]:
    """Units held out for valid and test: at least one for a non-zero ratio."""
    n_valid = max(1, round(ratios[1] * n)) if ratios[1] > 0 else 0
    n_test = max(1, round(ratios[2] * n)) if ratios[2] > 0 else 0
    return n_valid, n_test


def split_documents(n_docs: int, ratios: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Disjoint sets of document ids; valid/test get at least one document when their ratio is > 0."""
    order = np.random.default_rng([seed, 7]).permutation(n_docs)
    n_valid, n_test = _eval_counts(n_docs, ratios)
    n_train = n_docs - n_valid - n_test
    if n_train < 1:
        raise DomainLMError(
            f"the corpus has {n_docs} documents: too few to split {ratios} into train/valid/test; "
            "add documents or use --split 100,0,0"
        )
    return {
        "train": np.sort(order[:n_train]),
        "valid": np.sort(order[n_train : n_train + n_valid]),
        "test": np.sort(order[n_train + n_valid :]),
    }


def document_ranges(corpus: Corpus, docs: np.ndarray) -> np.ndarray:
    """[n, 2] int64 (first, end) sentence ids of the given documents."""
    offsets = corpus.document_offsets
    docs = np.asarray(docs, dtype=np.int64)
    return np.stack([offsets[docs], offsets[docs + 1]], axis=1).astype(np.int64, copy=False)


@dataclass
class CorpusSplit:
    """Sentence ranges per split ([n, 2] int64 (first, end)); `by` says how they were made."""

    ranges: dict[str, np.ndarray]
    by: str  # "documents" or "sentence-blocks"
    message: str = ""  # what was done instead of the requested split, for the user; empty when nothing was
    details: dict = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.ranges and len(self.ranges[name]) > 0

    def summary(self) -> dict:
        counts = {k: int(len(v)) for k, v in self.ranges.items()}
        sentences = {k: int((v[:, 1] - v[:, 0]).sum()) if len(v) else 0 for k, v in self.ranges.items()}
        return {"by": self.by, "ranges": counts, "sentences": sentences, **self.details}


def split_corpus(
    corpus: Corpus, ratios: tuple[float, float, float], seed: int, max_tokens: int = 512, min_sentences: int = 1
) -> CorpusSplit:
    """Split by documents when there are enough of them, else by held-out sentence blocks.

    "Enough": holding out at least one document for each evaluation split with a non-zero ratio leaves
    training at least half the share it asked for. Otherwise (one PDF book, a handful of files) valid and test
    become blocks of consecutive sentences cut from inside the documents (each about one sample long), and
    training keeps every sentence outside them; no sentence is in two splits.
    """
    n_docs = corpus.n_documents
    n_valid, n_test = _eval_counts(n_docs, ratios)
    n_train = n_docs - n_valid - n_test
    if n_valid + n_test == 0 or (n_train >= 1 and n_train >= ratios[0] * n_docs / 2):
        docs = split_documents(n_docs, ratios, seed)
        split = CorpusSplit({k: document_ranges(corpus, v) for k, v in docs.items()}, "documents")
        split.message = _held_out_share(corpus, split, ratios)
        return split
    return _split_blocks(corpus, ratios, seed, max_tokens, min_sentences)


# a document split that holds out more than this share of the tokens (and well over what --split asked) is said
LARGE_HOLD_OUT = 0.05


def _held_out_share(corpus: Corpus, split: CorpusSplit, ratios) -> str:
    """What a split by whole documents holds out, when that is a large share: with few documents (a book's
    chapters), one document per evaluation split can be far more than --split asked for."""
    held = {}
    for name in ("valid", "test"):
        if len(split.ranges.get(name, ())):  # (first, end) sentence of each document, read without the map
            bounds = corpus.read_sentence_offsets(np.asarray(split.ranges[name]).reshape(-1))
            held[name] = int((bounds[1::2] - bounds[0::2]).sum())
    share = sum(held.values()) / max(corpus.n_tokens, 1)
    if share <= max(LARGE_HOLD_OUT, 2 * (ratios[1] + ratios[2])):
        return ""
    docs = sum(len(split.ranges[name]) for name in held)
    asked = ",".join(f"{100 * r:g}" for r in ratios)
    return (
        f"valid and test hold out {docs} of {corpus.n_documents} documents ({sum(held.values()):,} tokens, "
        f"{100 * share:.0f}% of the corpus; --split {asked} asked for {100 * (ratios[1] + ratios[2]):g}%): each "
        "takes at least one whole document; give more documents, or e.g. --split 100,0,0 to train on all of them"
    )


def _split_blocks(corpus: Corpus, ratios, seed: int, max_tokens: int, min_sentences: int) -> CorpusSplit:
    n_docs, n_sent = corpus.n_documents, corpus.n_sentences
    asked = ",".join(f"{100 * r:g}" for r in ratios)
    doc_offsets = np.asarray(corpus.document_offsets, dtype=np.int64)
    lengths = np.diff(np.asarray(corpus.sentence_offsets, dtype=np.int64))
    doc_of = np.repeat(np.arange(n_docs), np.diff(doc_offsets))
    local = np.arange(n_sent) - doc_offsets[doc_of]  # sentence number inside its document
    mean_tokens = max(1.0, float(lengths.mean())) if n_sent else 1.0
    # blocks of k sentences, about one full sample each; smaller while there are too few to hold out
    k = max(min_sentences, round(max_tokens / mean_tokens))
    while True:
        block = np.concatenate([[0], np.flatnonzero((local % k == 0)[1:] | (doc_of[1:] != doc_of[:-1])) + 1, [n_sent]])
        firsts, ends = block[:-1], block[1:]
        candidates = np.flatnonzero(ends - firsts == k)  # whole blocks only (a document's tail may be short)
        n_valid, n_test = _eval_counts(len(firsts), ratios)
        if len(candidates) >= n_valid + n_test and len(firsts) - (n_valid + n_test) >= max(1, len(firsts) // 2):
            break
        if k == min_sentences:
            raise DomainLMError(
                f"the corpus has {n_docs} document(s) and {n_sent} sentences: too few to hold out valid and test "
                f"for --split {asked} even as blocks of {k} sentence(s); add documents or use --split 100,0,0 "
                "(no validation)"
            )
        k = max(min_sentences, k // 2)
    order = np.random.default_rng([seed, 7]).permutation(candidates)
    held = {"valid": np.sort(order[:n_valid]), "test": np.sort(order[n_valid : n_valid + n_test])}
    label = np.zeros(n_sent, dtype=np.int8)  # 0 train, 1 valid, 2 test
    for code, name in ((1, "valid"), (2, "test")):
        for b in held[name]:
            label[firsts[b] : ends[b]] = code
    ranges = {name: np.stack([firsts[held[name]], ends[held[name]]], axis=1).astype(np.int64) for name in held}
    # training: maximal runs of training sentences inside each document, so its samples span block borders
    train = label == 0
    starts = np.flatnonzero(train & np.concatenate([[True], (~train[:-1]) | (doc_of[1:] != doc_of[:-1])]))
    stops = np.flatnonzero(train & np.concatenate([(~train[1:]) | (doc_of[1:] != doc_of[:-1]), [True]])) + 1
    ranges["train"] = np.stack([starts, stops], axis=1).astype(np.int64)
    ranges = {name: ranges[name] for name in SPLITS}
    message = (
        f"the corpus has {n_docs} document(s): too few to split {asked} by documents; held out instead "
        f"{len(held['valid'])} block(s) for valid and {len(held['test'])} for test, each {k} consecutive sentences "
        f"cut from inside the documents ({int((label == 1).sum())} + {int((label == 2).sum())} of {n_sent} sentences); "
        "training keeps every other sentence, and no sentence is in two splits"
    )
    return CorpusSplit(ranges, "sentence-blocks", message, {"block_sentences": int(k)})


def build_samples(
    corpus: Corpus, docs: np.ndarray, max_tokens: int, short_seq_prob: float, min_sentences: int, seed: int
) -> tuple[np.ndarray, dict]:
    """Greedy packing of whole sentences up to a target length (max_tokens, or a random shorter one with
    probability short_seq_prob). `docs`: document ids, or an [n, 2] array of (first, end) sentence ranges.
    Returns an [n, 2] array of (first, end) sentence ids (int32 when the corpus allows), and a report."""
    ranges = np.asarray(docs) if np.ndim(docs) == 2 else document_ranges(corpus, docs)
    token_offsets = corpus.sentence_offsets
    first, end = ranges[:, 0], ranges[:, 1]
    usable = (end - first) >= min_sentences
    report = {
        "documents": int(len(ranges)),
        "documents_unusable": int((~usable).sum()),  # fewer sentences than a sample needs (2 for SOP)
        "sentences_unusable": int((end - first)[~usable].sum()),
    }
    pos, stop = first[usable], end[usable]
    rng = np.random.default_rng([seed, 11])
    # 32-bit ids halve the index; the values (and so the data order) are the same either way
    dtype = np.int32 if corpus.n_sentences < np.iinfo(np.int32).max else np.int64
    starts, ends = [], []
    while len(pos):
        target = np.full(len(pos), max_tokens, dtype=np.int64)
        short = rng.random(len(pos)) < short_seq_prob
        target[short] = rng.integers(2, max_tokens + 1, size=int(short.sum()))
        # the last sentence j with tokens[pos:j] <= target; at least min_sentences, never past the document
        nxt = np.searchsorted(token_offsets, token_offsets[pos] + target, side="right") - 1
        nxt = np.minimum(np.maximum(nxt, pos + min_sentences), stop)
        # a tail too short to be a sample of its own joins this one (it is truncated when read)
        nxt = np.where(stop - nxt < min_sentences, stop, nxt)
        starts.append(pos.astype(dtype))
        ends.append(nxt.astype(dtype))
        keep = nxt < stop
        pos, stop = nxt[keep], stop[keep]
    samples = np.empty((sum(len(s) for s in starts), 2), dtype=dtype)
    if starts:
        np.concatenate(starts, out=samples[:, 0])
        del starts
        np.concatenate(ends, out=samples[:, 1])
        del ends
    report["samples"] = int(len(samples))
    report["samples_truncated"] = report["tokens"] = 0
    for lo in range(0, len(samples), 1 << 20):  # in chunks: the temporaries stay small whatever the corpus
        part = samples[lo : lo + (1 << 20)]
        lengths = token_offsets[part[:, 1]] - token_offsets[part[:, 0]]
        report["samples_truncated"] += int((lengths > max_tokens).sum())
        report["tokens"] += int(np.minimum(lengths, max_tokens).sum())
    return samples, report


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Atomic: concurrent writers (ranks, workers) of the same content never leave a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def cached_samples(
    corpus: Corpus, split: str, docs: np.ndarray, max_tokens: int, short_seq_prob: float, min_sentences: int, seed: int
) -> tuple[np.ndarray, dict]:
    """build_samples, cached in <corpus>/cache keyed by everything that changes the result; the index comes
    back memory-mapped (read-only), so it costs page cache, not process memory."""
    ranges = np.asarray(docs) if np.ndim(docs) == 2 else document_ranges(corpus, docs)
    key_src = json.dumps(
        [
            corpus.meta.get("fingerprint"),
            corpus.n_tokens,
            split,
            hashlib.sha256(np.ascontiguousarray(ranges, dtype=np.int64).data).hexdigest(),
            max_tokens,
            short_seq_prob,
            min_sentences,
            seed,
        ]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cache = corpus.path / "cache"
    path, report_path = cache / f"samples-{split}-{key}.npy", cache / f"samples-{split}-{key}.json"
    if path.is_file() and report_path.is_file():
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False), json.loads(report_path.read_text())
        except (OSError, ValueError):  # a damaged cache entry is rebuilt
            pass
    samples, report = build_samples(corpus, ranges, max_tokens, short_seq_prob, min_sentences, seed)
    try:
        cache.mkdir(exist_ok=True)
        report_path.write_text(json.dumps(report))
        _save_npy(path, samples)  # last: its presence marks the entry complete
    except OSError as e:  # a read-only corpus still trains; the index is rebuilt next time
        print(f"warning: could not cache the sample index in {cache}: {e}", file=sys.stderr)
        return samples, report
    del samples
    return np.load(path, mmap_mode="r", allow_pickle=False), report


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 13, epoch]).permutation(n)


def cached_epoch_order(cache: Path | None, n: int, seed: int, epoch: int) -> np.ndarray:
    """epoch_order, kept as a memory-mapped file beside the index so that every rank and DataLoader worker
    shares one copy (values identical to epoch_order; 32-bit where they fit). Small ones stay in memory."""
    if cache is None or n < SHARED_ORDER_MIN:
        return epoch_order(n, seed, epoch)
    path = cache / f"order-{n}-{seed}-{epoch}.npy"
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        pass
    order = epoch_order(n, seed, epoch)
    try:
        cache.mkdir(exist_ok=True)
        _save_npy(path, order.astype(np.int32) if n < np.iinfo(np.int32).max else order)
    except OSError:  # a read-only corpus: this process keeps its own copy
        return order
    del order
    return np.load(path, mmap_mode="r", allow_pickle=False)
