"""False-positive rate and power of the sweep's checkpoint-vs-base test on constructed data, beside the test it
replaced (test rows resampled, seed-averaged correctness). Seconds, numpy only:

    python bench/significance_check.py
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from domainlm.stats import compare_arrays  # noqa: E402
from tests.test_stats import row_bootstrap_p, simulate  # noqa: E402

print("identical models, 300 test rows: share of repetitions declared different at p < 0.05 (should be <= 0.05)")
print("seeds  seed sd (logit)  two-level t-test  row bootstrap (old)")
for seeds, sd in [(2, 0.3), (3, 0.3), (3, 0.0), (5, 0.15)]:
    rng = np.random.default_rng(2026)
    base, cand = simulate(rng, 4000, seeds, 300, sd)
    new = (compare_arrays(cand, base)["p_value"] < 0.05).mean()
    old = (row_bootstrap_p(cand[:1000], base[:1000], rng) < 0.05).mean()
    print(f"{seeds:5d}  {sd:15.2f}  {new:16.3f}  {old:19.3f}")
print("\na real difference, 500 test rows, seed sd 0.1: share found at p < 0.05")
for seeds, gain in [(3, 0.5), (2, 0.3), (3, 0.3)]:
    rng = np.random.default_rng(7)
    base, cand = simulate(rng, 1000, seeds, 500, 0.1, gain)
    found = (compare_arrays(cand, base)["p_value"] < 0.05).mean()
    print(f"seeds {seeds}, +{100 * (cand.mean() - base.mean()):.1f} points: {found:.3f}")
