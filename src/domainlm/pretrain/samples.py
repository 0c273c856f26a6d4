"""Document split and the sample index: runs of consecutive sentences of one document, cached on disk.

A sample is (first sentence, end sentence). The index is built once per parameter set with numpy, advancing
every document at once (one numpy step per sample *position*, not per sentence), and does not depend on
max_steps: the order in which samples are drawn is a per-epoch permutation computed from the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np

from domainlm.data.store import Corpus
from domainlm.errors import DomainLMError

SPLITS = ("train", "valid", "test")


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0 or parts[0] <= 0:
        raise DomainLMError(f"--split {text!r}: expected three ratios train,valid,test such as 98,1,1")
    total = sum(parts)
    return tuple(p / total for p in parts)  # type: ignore[return-value]


def split_documents(n_docs: int, ratios: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """Disjoint sets of document ids; valid/test get at least one document when their ratio is > 0."""
    order = np.random.default_rng([seed, 7]).permutation(n_docs)
    n_valid = max(1, round(ratios[1] * n_docs)) if ratios[1] > 0 else 0
    n_test = max(1, round(ratios[2] * n_docs)) if ratios[2] > 0 else 0
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


def build_samples(
    corpus: Corpus, docs: np.ndarray, max_tokens: int, short_seq_prob: float, min_sentences: int, seed: int
) -> tuple[np.ndarray, dict]:
    """Greedy packing of whole sentences up to a target length (max_tokens, or a random shorter one with
    probability short_seq_prob). Returns an int64 array [n, 2] of (first, end) sentence ids, and a report."""
    doc_offsets = np.asarray(corpus.document_offsets)
    token_offsets = np.asarray(corpus.sentence_offsets)
    first, end = doc_offsets[docs], doc_offsets[docs + 1]
    usable = (end - first) >= min_sentences
    report = {
        "documents": int(len(docs)),
        "documents_unusable": int((~usable).sum()),  # fewer sentences than a sample needs (1 for SOP)
        "sentences_unusable": int((end - first)[~usable].sum()),
    }
    pos, stop = first[usable].copy(), end[usable]
    rng = np.random.default_rng([seed, 11])
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
        starts.append(pos)
        ends.append(nxt)
        keep = nxt < stop
        pos, stop = nxt[keep], stop[keep]
    samples = np.stack([np.concatenate(starts), np.concatenate(ends)], axis=1) if starts else np.zeros((0, 2), np.int64)
    lengths = token_offsets[samples[:, 1]] - token_offsets[samples[:, 0]]
    report["samples"] = int(len(samples))
    report["samples_truncated"] = int((lengths > max_tokens).sum())
    report["tokens"] = int(np.minimum(lengths, max_tokens).sum())
    return samples.astype(np.int64), report


def cached_samples(
    corpus: Corpus, split: str, docs: np.ndarray, max_tokens: int, short_seq_prob: float, min_sentences: int, seed: int
) -> tuple[np.ndarray, dict]:
    """build_samples, cached in <corpus>/cache keyed by everything that changes the result."""
    key_src = json.dumps([corpus.meta.get("fingerprint"), corpus.n_tokens, split, hashlib.sha256(docs.tobytes()).hexdigest(),
                          max_tokens, short_seq_prob, min_sentences, seed])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cache = corpus.path / "cache"
    path = cache / f"samples-{split}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return f["samples"], json.loads(str(f["report"]))
    samples, report = build_samples(corpus, docs, max_tokens, short_seq_prob, min_sentences, seed)
    try:
        cache.mkdir(exist_ok=True)
        tmp = cache / f".{path.name}.{os.getpid()}.tmp.npz"
        np.savez(tmp, samples=samples, report=json.dumps(report))
        os.replace(tmp, path)
    except OSError as e:  # a read-only corpus still trains; the index is rebuilt next time
        print(f"warning: could not cache the sample index in {cache}: {e}", file=sys.stderr)
    return samples, report


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, 13, epoch]).permutation(n)

