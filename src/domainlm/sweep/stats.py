"""Is a checkpoint better than its base model, or is the difference noise?

Paired bootstrap over test examples: each example's correctness is averaged over seeds for both models; the
test rows are resampled with replacement, and the p-value is the share of resamples in which the checkpoint
does not beat the base (one-sided). Single-run differences of 0.5-1.5 points on a few hundred rows are
typically not significant.
"""

from __future__ import annotations

import numpy as np


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def paired_bootstrap(candidate: np.ndarray, base: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """candidate, base: per-example scores in [0, 1] (correctness, averaged over seeds), same examples, same order."""
    candidate, base = np.asarray(candidate, float), np.asarray(base, float)
    if candidate.shape != base.shape or candidate.ndim != 1 or len(candidate) == 0:
        raise ValueError("paired_bootstrap needs two equally long, non-empty score vectors")
    diff = candidate - base
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[idx].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": float(diff.mean()), "p_value": float((means <= 0).mean()), "ci95": [float(low), float(high)],
            "n": int(len(diff))}
