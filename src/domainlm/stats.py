"""Is a checkpoint better than its base model, or is the difference noise?

Two things make a sweep's numbers vary: which rows happen to be in the test set, and the fine-tuning seed (data
order, dropout, the validation split). A test that resamples only test rows of seed-averaged results ignores the
second and, with two or three seeds whose accuracies differ by several points, declares wins that a rerun does not
reproduce. So the test here estimates both variance components from the cells (a two-level model):

    correct[seed, row] = model mean + row effect + seed effect + noise

- seed variance of each model: the spread of its per-seed accuracies, less the part that row-level noise alone
  explains (sigma_e^2 / rows, sigma_e^2 from the seed x row residuals);
- row variance of the difference: the variance over test rows of (checkpoint - base) correctness, each averaged over
  that model's seeds, divided by the number of rows.

The difference of the two means is divided by the combined standard error and referred to Student's t with
Welch-Satterthwaite degrees of freedom. With 2 seeds a model's seed variance rests on one degree of freedom, so the
test is cautious; that is the honest price of few seeds, and a bootstrap over 2 seeds (whose resamples have half the
true seed variance) would hide it and win too often. tests/test_stats.py checks on constructed data that identical
models are declared different in about 5% of repetitions, and that a real difference is found.

Several checkpoints of one model are compared with the same base: their p-values are adjusted by Holm's method
(family-wise error 5% per model, valid under any dependence between the tests).
"""

from __future__ import annotations

import numpy as np


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _components(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x: (..., seeds, rows) correctness. Returns the seed variance of the model's mean, the between-seed variance
    of that mean (which the degrees of freedom are computed from: smaller df, a test that keeps its 5% level with
    2 seeds), and the degrees of freedom; nan with one seed."""
    s, n = x.shape[-2], x.shape[-1]
    if s < 2:
        nan = np.full(x.shape[:-2], np.nan)
        return nan, nan, nan
    seed_means = x.mean(axis=-1)
    between = seed_means.var(axis=-1, ddof=1)
    resid = x - x.mean(axis=-2, keepdims=True) - seed_means[..., None] + x.mean(axis=(-2, -1))[..., None, None]
    noise = (resid**2).sum(axis=(-2, -1)) / ((s - 1) * max(n - 1, 1))
    sigma_u2 = np.maximum(between - noise / n, 0.0)
    return sigma_u2 / s, between / s, np.full(x.shape[:-2], float(s - 1))


def compare_arrays(candidate: np.ndarray, base: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised over leading axes: candidate (..., S_c, N), base (..., S_b, N), both 0/1 (or scores in [0, 1]) on
    the same N test rows in the same order. One-sided both ways: p_value, does the candidate score higher? p_worse,
    does it score lower? (A one-sided test cannot see a loss; the second one says when there is one.)"""
    from scipy import stats

    candidate, base = np.asarray(candidate, float), np.asarray(base, float)
    n = candidate.shape[-1]
    diff_rows = candidate.mean(axis=-2) - base.mean(axis=-2)
    difference = diff_rows.mean(axis=-1)
    v_rows = diff_rows.var(axis=-1, ddof=1) / n if n > 1 else np.zeros_like(difference)
    v_c, w_c, df_c = _components(candidate)
    v_b, w_b, df_b = _components(base)
    # one model with a single seed: assume its seed variance equals the other's (same architecture, same recipe)
    ratio = base.shape[-2] / candidate.shape[-2]
    v_c, w_c, df_c = (
        np.where(np.isnan(v_c), v_b * ratio, v_c),
        np.where(np.isnan(w_c), w_b * ratio, w_c),
        np.where(np.isnan(df_c), df_b, df_c),
    )
    v_b, w_b, df_b = (
        np.where(np.isnan(v_b), v_c / ratio, v_b),
        np.where(np.isnan(w_b), w_c / ratio, w_b),
        np.where(np.isnan(df_b), df_c, df_b),
    )
    seed_known = ~np.isnan(v_c)
    v_c, v_b, w_c, w_b = (np.nan_to_num(v) for v in (v_c, v_b, w_c, w_b))
    se2 = v_rows + v_c + v_b
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = v_rows**2 / max(n - 1, 1) + np.where(seed_known, w_c**2 / df_c + w_b**2 / df_b, 0.0)
        df = np.where(denom > 0, se2**2 / denom, float(max(n - 1, 1)))
        se = np.sqrt(se2)
        t = np.where(se > 0, difference / se, np.where(difference > 0, np.inf, np.where(difference < 0, -np.inf, 0.0)))
    p = stats.t.sf(t, df)
    p_worse = stats.t.cdf(t, df)
    p = np.where((se == 0) & (difference == 0), 1.0, p)  # identical results: no evidence at all
    p_worse = np.where((se == 0) & (difference == 0), 1.0, p_worse)
    half = stats.t.ppf(0.975, df) * se
    return {
        "difference": difference,
        "p_value": p,
        "p_worse": p_worse,
        "se": se,
        "df": df,
        "low": difference - half,
        "high": difference + half,
        "seed_variance_known": seed_known,
    }


def compare(candidate: np.ndarray, base: np.ndarray) -> dict:
    """candidate (S_c, N), base (S_b, N): per-seed, per-row correctness of a checkpoint and its base model."""
    candidate, base = np.atleast_2d(np.asarray(candidate, float)), np.atleast_2d(np.asarray(base, float))
    if candidate.shape[-1] != base.shape[-1] or candidate.shape[-1] == 0:
        raise ValueError("compare needs both models scored on the same, non-empty test rows")
    r = compare_arrays(candidate, base)
    return {
        "difference": float(r["difference"]),
        "p_value": float(r["p_value"]),
        "p_worse": float(r["p_worse"]),
        "se": float(r["se"]),
        "df": float(r["df"]),
        "ci95": [float(r["low"]), float(r["high"])],
        "rows": int(candidate.shape[-1]),
        "seeds": [int(candidate.shape[0]), int(base.shape[0])],
        "seed_variance_known": bool(r["seed_variance_known"]),
    }


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (same order as given; vectorised over leading axes, tests on the last)."""
    p = np.asarray(p_values, dtype=float)
    m = p.shape[-1]
    if m == 0:
        return p
    order = np.argsort(p, axis=-1)
    ranked = np.take_along_axis(p, order, axis=-1) * (m - np.arange(m))
    ranked = np.minimum(np.maximum.accumulate(ranked, axis=-1), 1.0)
    adjusted = np.empty_like(ranked)
    np.put_along_axis(adjusted, order, ranked, axis=-1)
    return adjusted
