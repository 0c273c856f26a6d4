"""Whole-word, n-gram masking, decided per sample from its own random generator.

Each sample's generator is seeded with (seed, split, global sample number), so masks are reproducible
whatever the number of DataLoader workers or processes, and differ across epochs (dynamic masking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class MaskingOptions:
    masked_lm_prob: float = 0.15
    max_predictions: int = 80  # per-sequence cap
    max_ngrams: int = 3
    favor_longer_ngram: bool = False
    whole_word: bool = True


def ngram_probabilities(max_ngrams: int, favor_longer: bool) -> np.ndarray:
    """p(n) proportional to 1/n (short spans most often), or reversed to favour longer spans."""
    p = 1.0 / np.arange(1, max_ngrams + 1)
    if favor_longer:
        p = p[::-1]
    return p / p.sum()


def mask_tokens(
    ids: np.ndarray,
    word_starts: np.ndarray,
    special: np.ndarray,
    options: MaskingOptions,
    vocab_size: int,
    mask_id: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (input ids with masks applied, labels with -100 where nothing is predicted)."""
    candidates = np.flatnonzero(~special)
    labels = np.full(len(ids), -100, dtype=np.int64)
    if len(candidates) == 0:
        return ids.copy(), labels
    # Word boundaries among the maskable positions; a word never spans a special token.
    if options.whole_word:
        begins = word_starts[candidates].copy()
        begins[0] = True
        begins[1:] |= np.diff(candidates) != 1
    else:
        begins = np.ones(len(candidates), dtype=bool)
    word_begin = np.flatnonzero(begins)
    word_end = np.append(word_begin[1:], len(candidates))
    budget = min(options.max_predictions, max(1, int(round(len(candidates) * options.masked_lm_prob))))
    pvals = ngram_probabilities(options.max_ngrams, options.favor_longer_ngram)
    n_words = len(word_begin)
    chosen = np.zeros(n_words, dtype=bool)
    covered = 0
    spans = rng.choice(len(pvals), size=n_words, p=pvals) + 1
    for w, n in zip(rng.permutation(n_words), spans):
        if covered >= budget:
            break
        while n > 0:  # shrink the n-gram until it fits the remaining budget
            last = min(w + n, n_words)
            size = word_end[last - 1] - word_begin[w]
            if covered + size <= budget:
                break
            n -= 1
        if n == 0 or chosen[w:last].any():
            continue
        chosen[w:last] = True
        covered += size
    if covered == 0:  # every word is longer than the budget: mask one word anyway, cut to the budget
        w = rng.integers(n_words)
        chosen[w] = True
    picked = np.zeros(len(candidates), dtype=bool)
    for w in np.flatnonzero(chosen):
        picked[word_begin[w] : word_end[w]] = True
    positions = candidates[picked][: max(budget, 1)]
    labels[positions] = ids[positions]
    out = ids.copy()
    roll = rng.random(len(positions))
    out[positions[roll < 0.8]] = mask_id
    randomize = positions[(roll >= 0.8) & (roll < 0.9)]
    out[randomize] = rng.integers(0, vocab_size, size=len(randomize))
    return out, labels


def default_max_predictions(max_seq_len: int, masked_lm_prob: float) -> int:
    return max(1, math.ceil(max_seq_len * masked_lm_prob))
