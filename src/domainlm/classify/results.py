"""What a classifier run measured, kept in memory until the command writes its reports once: each model's metrics
and probabilities on the rows it was scored on (dev, test, a fold's held-out rows, the --test rows of a fold).

Folder names of a run's parts, spelled here only: seed-N (one run per seed), fold-K (one per fold), floor (the
classical floor beside; floor/fold-K with folds), plain (distill's plainly fine-tuned student).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from domainlm.classify.data import Dataset
from domainlm.outputs import Writer

FLOOR = "floor"
PLAIN = "plain"
HELD_OUT = "held_out"  # a fold's held-out rows (never called "test", which is the --test file)
TEST_FILE = "test_file"  # the --test rows scored by one fold's model (the ensemble averages them)


def seed_folder(seed: int) -> str:
    return f"seed-{seed}"


def fold_folder(k: int) -> str:
    return f"fold-{k}"


@dataclass
class Scored:
    """One model's results: `metrics` (what metrics.json holds), and its probabilities and the rows they score,
    by split name; `fit` the rows it trained on, `folder` where its files are."""

    metrics: dict
    probs: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, Dataset] = field(default_factory=dict)
    thresholds: np.ndarray | None = None
    fit: Dataset | None = None
    folder: Writer | None = None

    def correct(self, split: str, labels: list[str], multilabel: bool) -> np.ndarray:
        """Per-row correctness (1.0 where the chosen labels are the gold ones): what the paired tests compare."""
        from domainlm.classify.metrics import choose

        chosen = choose(self.probs[split], multilabel, self.thresholds)
        return np.asarray(
            [sorted(labels[j] for j in c) == sorted(ex.labels) for c, ex in zip(chosen, self.rows[split].examples)],
            dtype=float,
        )
