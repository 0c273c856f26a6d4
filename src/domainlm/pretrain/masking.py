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
    n_words = len(word_begin)
    # the draws of rng.choice(len(p), size=n_words, p=p), without its ~50 us of checks on p per sample
    cdf = ngram_probabilities(options.max_ngrams, options.favor_longer_ngram).cumsum()
    spans = (cdf / cdf[-1]).searchsorted(rng.random(n_words), side="right") + 1
    # plain Python values in the loop: numpy scalar indexing made this loop most of a sample's preparation time
    begin, end, chosen, covered = word_begin.tolist(), word_end.tolist(), bytearray(n_words), 0
    for w, n in zip(rng.permutation(n_words).tolist(), spans.tolist()):
        if covered >= budget:
            break
        while n > 0:  # shrink the n-gram until it fits the remaining budget
            last = min(w + n, n_words)
            size = end[last - 1] - begin[w]
            if covered + size <= budget:
                break
            n -= 1
        if n == 0 or any(chosen[w:last]):
            continue
        chosen[w:last] = b"\x01" * (last - w)
        covered += size
    if covered == 0:  # every word is longer than the budget: mask one word anyway, cut to the budget
        chosen[int(rng.integers(n_words))] = 1
    picked = np.repeat(np.frombuffer(bytes(chosen), dtype=bool), word_end - word_begin)  # words tile the candidates
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
