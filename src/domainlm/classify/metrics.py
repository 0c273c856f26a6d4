"""Classification metrics (scikit-learn underneath), per group, and the tolerant accuracy.

Tolerant accuracy (configurable k):
- multi-class: the gold label is among the k highest-scoring predictions (k=1 is plain accuracy; default k=2);
- multi-label: the predicted label set and the gold set share at least one label.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def topk_accuracy(scores: np.ndarray, gold: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1)[:, :k]
    return float((top == gold[:, None]).any(axis=1).mean())


def ordinal_metrics(pred: np.ndarray, gold: np.ndarray) -> dict:
    """Labels on an ordered scale (class index = position on it): mean absolute error in classes, and the share
    of rows predicted within one class of the gold one."""
    distance = np.abs(np.asarray(pred) - np.asarray(gold))
    return {"mae_classes": float(distance.mean()), "accuracy_within_1": float((distance <= 1).mean())}


def multiclass_metrics(
    scores: np.ndarray,
    gold: np.ndarray,
    labels: list[str],
    tolerant_k: int = 2,
    groups: list[str] | None = None,
    ordinal: bool = False,
) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    pred = scores.argmax(axis=1)
    ids = list(range(len(labels)))
    result = {
        "n": int(len(gold)),
        "accuracy": float(accuracy_score(gold, pred)),
        f"tolerant_accuracy@{tolerant_k}": topk_accuracy(scores, gold, tolerant_k),
    }
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(gold, pred, labels=ids, average=avg, zero_division=0)
        result.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    if ordinal:
        result.update(ordinal_metrics(pred, gold))
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=ids, average=None, zero_division=0)
    result["per_class"] = {
        labels[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i in ids
    }
    result["confusion_matrix"] = confusion_matrix(gold, pred, labels=ids).tolist()
    if groups is not None:
        correct = pred == gold
        tolerant = (np.argsort(-scores, axis=1)[:, :tolerant_k] == gold[:, None]).any(axis=1)
        result["per_group"] = _per_group(groups, correct, tolerant, tolerant_k)
    return result


def multilabel_metrics(
    probs: np.ndarray, gold: np.ndarray, labels: list[str], thresholds: np.ndarray, groups: list[str] | None = None
) -> dict:
    from sklearn.metrics import accuracy_score, hamming_loss, precision_recall_fscore_support

    pred = (probs >= thresholds[None, :]).astype(int)
    gold = gold.astype(int)
    overlap = (pred & gold).sum(axis=1) > 0
    result = {
        "n": int(len(gold)),
        "subset_accuracy": float(accuracy_score(gold, pred)),
        "hamming_loss": float(hamming_loss(gold, pred)),
        "tolerant_accuracy": float(overlap.mean()),
    }
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(gold, pred, average=avg, zero_division=0)
        result.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    p, r, f, s = precision_recall_fscore_support(gold, pred, average=None, zero_division=0)
    result["per_class"] = {
        labels[i]: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
            "threshold": float(thresholds[i]),
        }
        for i in range(len(labels))
    }
    if groups is not None:
        exact = (pred == gold).all(axis=1)
        result["per_group"] = _per_group(groups, exact, overlap, None)
    return result


def _per_group(groups: list[str], correct: np.ndarray, tolerant: np.ndarray, k: int | None) -> dict:
    by = defaultdict(list)
    for i, g in enumerate(groups):
        by[g].append(i)
    name = f"tolerant_accuracy@{k}" if k else "tolerant_accuracy"
    return {
        g: {"n": len(idx), "accuracy": float(correct[idx].mean()), name: float(tolerant[idx].mean())}
        for g, idx in sorted(by.items())
    }


def tune_thresholds(probs: np.ndarray, gold: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per label, the threshold that maximises F1 on the given (dev) data; 0.5 where the label never occurs."""
    from sklearn.metrics import f1_score

    grid = np.linspace(0.05, 0.95, 19) if grid is None else grid
    best = np.full(probs.shape[1], 0.5)
    for j in range(probs.shape[1]):
        if gold[:, j].sum() == 0:
            continue
        f1s = [f1_score(gold[:, j], probs[:, j] >= t, zero_division=0) for t in grid]
        best[j] = grid[int(np.argmax(f1s))]
    return best


def thresholds_of(n_labels: int, tuned) -> np.ndarray:
    """Multi-label decision thresholds: the ones tuned on the dev set and saved with the model, else 0.5."""
    return np.full(n_labels, 0.5) if tuned is None else np.asarray(tuned, dtype=float)


def choose(probs: np.ndarray, multilabel: bool, thresholds: np.ndarray | None = None) -> list[list[int]]:
    """The chosen label indices of each row: the argmax, or every label at or above its threshold."""
    if multilabel:
        over = probs >= thresholds_of(probs.shape[-1], thresholds)
        return [np.flatnonzero(row).tolist() for row in over]
    return [[int(j)] for j in probs.argmax(axis=-1)] if len(probs) else []


def best_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest probabilities of each row, best first (ties: the lower index first)."""
    return np.argsort(-probs, axis=-1, kind="stable")[:, :k]


def metric_names(multilabel: bool, tolerant_k: int = 2, ordinal: bool = False) -> list[str]:
    """The scalar metrics a task computes, read off the metric functions themselves (so the list cannot drift)."""
    scores = np.array([[0.9, 0.1], [0.2, 0.8]])
    if multilabel:
        result = multilabel_metrics(scores, np.array([[1, 0], [0, 1]]), ["a", "b"], np.full(2, 0.5))
    else:
        result = multiclass_metrics(scores, np.array([0, 1]), ["a", "b"], tolerant_k, ordinal=ordinal)
    return [k for k, v in result.items() if isinstance(v, float)]


def scalars(metrics: dict) -> dict:
    """The single-number metrics of a metrics dict (not the row count, tables or per-class parts)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "n"}


def aggregate(runs: list[dict]) -> dict:
    """Mean and standard deviation of every scalar metric over runs (folds or seeds)."""
    keys = list(scalars(runs[0]))
    return {
        k: {
            "mean": float(np.mean([r[k] for r in runs])),
            "std": float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0,
        }
        for k in keys
    }


def confusion_png(matrix: list[list[int]], labels: list[str], path) -> None:
    from domainlm.plots import pyplot

    plt = pyplot()

    m = np.asarray(matrix)
    size = max(4, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
