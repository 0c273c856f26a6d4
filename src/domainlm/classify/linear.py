"""The classical floor: character n-gram TF-IDF + a linear classifier (scikit-learn).

Every comparison shows it, because on short Chinese texts it is often hard to beat, and for some users it is the
right answer (`domainlm finetune --method linear`). The choices are made on the dev rows only:
- features: character n-grams within word boundaries (char_wb, 1-3) or across them (char, 2-4), sublinear tf;
- classifier: logistic regression or a linear SVM, C in {0.1, 1, 10};
- multi-label: one binary classifier per label (candidates compared at threshold 0.5), then per-label
  thresholds tuned on dev for the chosen one.
Candidates are ranked by the same metric that picks the transformer's best epoch.

Saved as plain data, never pickled: `linear.json` (options, labels, thresholds, n-gram vocabulary) and
`linear.npz` (idf, weights, intercepts), loaded with `np.load(allow_pickle=False)`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from domainlm.classify.data import Dataset, targets
from domainlm.classify.metrics import aggregate, scalars, tune_thresholds
from domainlm.classify.report import score, write_outputs
from domainlm.classify.results import FLOOR, TEST_FILE, Scored, fold_folder
from domainlm.errors import DomainLMError
from domainlm.outputs import Writer

FEATURES = (("char_wb", (1, 3)), ("char", (2, 4)))
CLASSIFIERS = ("logreg", "svm")
C_GRID = (0.1, 1.0, 10.0)
FORMAT = "domainlm-linear"


@dataclass
class LinearModel:
    labels: list[str]
    multilabel: bool
    analyzer: str
    ngram_range: tuple[int, int]
    classifier: str
    C: float
    vocabulary: list[str]
    idf: np.ndarray
    coef: np.ndarray  # (labels, features): softmax (multi-class) or sigmoid (multi-label) of X @ coef.T + intercept
    intercept: np.ndarray
    thresholds: np.ndarray | None = None
    selection: list[dict] = field(default_factory=list)  # every candidate with its dev score
    settings: dict = field(default_factory=dict)  # what inference reads besides the weights: text/pair columns, task

    @property
    def description(self) -> str:
        name = "logistic regression" if self.classifier == "logreg" else "linear SVM"
        lo, hi = self.ngram_range
        return f"char{'_wb' if self.analyzer == 'char_wb' else ''} {lo}-{hi}-gram TF-IDF + {name} (C={self.C:g})"

    def _vectorizer(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(
            analyzer=self.analyzer,
            ngram_range=self.ngram_range,
            sublinear_tf=True,
            vocabulary={t: i for i, t in enumerate(self.vocabulary)},
        )
        vec.idf_ = self.idf
        return vec

    def scores(self, data: Dataset) -> np.ndarray:
        return self.text_scores(texts(data))

    def text_scores(self, rows: list[str]) -> np.ndarray:
        return _scores(self._vectorizer().transform(rows), self.coef, self.intercept, self.multilabel)


def texts(data: Dataset) -> list[str]:
    return joined(*data.columns())


def joined(texts: list[str], pairs: list[str | None] | None) -> list[str]:
    """One string per row for the n-gram features: a text pair follows its text on a new line."""
    return texts if pairs is None else [t if q is None else f"{t}\n{q}" for t, q in zip(texts, pairs)]


def _scores(x, coef: np.ndarray, intercept: np.ndarray, multilabel: bool) -> np.ndarray:
    z = np.asarray(x @ coef.T) + intercept[None, :]
    if multilabel:
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _estimator(kind: str, c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if kind == "logreg":
        return LogisticRegression(C=c, max_iter=2000)
    return LinearSVC(C=c, max_iter=5000)


def _fit_weights(
    x, y: np.ndarray, kind: str, c: float, n_labels: int, multilabel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Weights in one shape for every case: (labels, features) and (labels,)."""
    if multilabel:
        coef, intercept = np.zeros((n_labels, x.shape[1])), np.zeros(n_labels)
        for j in range(n_labels):
            column = y[:, j].astype(int)
            if column.min() == column.max():  # a label always or never present: a constant score
                intercept[j] = 10.0 if column[0] else -10.0
                continue
            est = _estimator(kind, c).fit(x, column)
            coef[j], intercept[j] = est.coef_[0], est.intercept_[0]
        return coef, intercept
    present = np.unique(y)
    est = _estimator(kind, c).fit(x, y)
    coef, intercept = (
        np.zeros((n_labels, x.shape[1])),
        np.full(n_labels, -1e4),
    )  # labels absent from training: never chosen
    if len(present) == 2:  # one weight vector w: softmax([-w/2, w/2]) equals sigmoid(w)
        coef[present[0]], coef[present[1]] = -est.coef_[0] / 2, est.coef_[0] / 2
        intercept[present[0]], intercept[present[1]] = -est.intercept_[0] / 2, est.intercept_[0] / 2
    else:
        coef[present], intercept[present] = est.coef_, est.intercept_
    return coef, intercept


def fit(
    train: Dataset, dev: Dataset, labels: list[str], multilabel: bool, metric: str, tolerant_k: int = 2
) -> LinearModel:
    """Every candidate fitted on train and scored on dev by `metric`; the best one (first on ties) is returned."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    y = targets(train, labels, multilabel)
    dev_gold = targets(dev, labels, True) if multilabel else None
    best, best_value, selection = None, -np.inf, []
    for analyzer, ngrams in FEATURES:
        vec = TfidfVectorizer(analyzer=analyzer, ngram_range=ngrams, sublinear_tf=True)
        x = vec.fit_transform(texts(train))
        x_dev = vec.transform(texts(dev))
        for kind in CLASSIFIERS:
            for c in C_GRID:
                coef, intercept = _fit_weights(x, y, kind, c, len(labels), multilabel)
                probs = _scores(x_dev, coef, intercept, multilabel)
                m = score(probs, dev, labels, multilabel, tolerant_k)  # multi-label: thresholds tuned for the pick only
                if metric not in m:
                    raise DomainLMError(
                        f"--metric {metric!r} is not computed; choose one of "
                        f"{', '.join(k for k, v in m.items() if isinstance(v, float))}"
                    )
                selection.append(
                    {
                        "analyzer": analyzer,
                        "ngram_range": list(ngrams),
                        "classifier": kind,
                        "C": c,
                        f"dev_{metric}": round(float(m[metric]), 6),
                    }
                )
                if m[metric] > best_value:
                    best_value = m[metric]
                    best = LinearModel(
                        labels,
                        multilabel,
                        analyzer,
                        ngrams,
                        kind,
                        c,
                        vec.get_feature_names_out().tolist(),
                        vec.idf_.copy(),
                        coef,
                        intercept,
                    )
                    best_probs = probs
    best.selection = selection
    if multilabel:
        best.thresholds = tune_thresholds(best_probs, dev_gold)
    return best


def evaluate(
    train: Dataset,
    dev: Dataset,
    evaluated: dict[str, Dataset],
    labels: list[str],
    multilabel: bool,
    metric: str,
    tolerant_k: int = 2,
) -> tuple[LinearModel, Scored]:
    """Fit the floor and score it on dev and on each of `evaluated` (by split name) with the same metric functions as
    the transformer; the probabilities are kept (Scored)."""
    start = time.perf_counter()
    model = fit(train, dev, labels, multilabel, metric, tolerant_k)
    rows = {"dev": dev, **evaluated}
    probs = {name: model.scores(data) for name, data in rows.items()}
    metrics = {"method": model.description, "train_rows": len(train), "selected_on": f"dev {metric}"}
    metrics |= {
        name: score(probs[name], data, labels, multilabel, tolerant_k, model.thresholds)
        for name, data in rows.items()
        if name != TEST_FILE
    }
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    return model, Scored(metrics, probs, rows, model.thresholds, fit=train)


def save(model: LinearModel, folder: Writer | str | Path, cfg=None) -> None:
    """linear.npz and linear.json, each written atomically. cfg (a FinetuneConfig): its inference settings are saved
    too, but max_seq_len (the floor reads no tokens)."""
    import io

    from domainlm.outputs import Plain

    if cfg is not None:
        model.settings = {k: v for k, v in cfg.inference_settings().items() if k != "max_seq_len"}
    folder = folder if isinstance(folder, Writer) else Plain(folder)
    meta = {
        "format": FORMAT,
        "version": 1,
        "labels": model.labels,
        "multilabel": model.multilabel,
        "analyzer": model.analyzer,
        "ngram_range": list(model.ngram_range),
        "classifier": model.classifier,
        "C": model.C,
        "description": model.description,
        "thresholds": None if model.thresholds is None else [float(t) for t in model.thresholds],
        "selection": model.selection,
        "settings": model.settings,
        "vocabulary": model.vocabulary,
    }
    arrays = io.BytesIO()
    np.savez(arrays, idf=model.idf, coef=model.coef, intercept=model.intercept)
    folder.write_bytes("linear.npz", arrays.getvalue())
    folder.write_text("linear.json", json.dumps(meta, ensure_ascii=False))


def is_linear(folder: str | Path) -> bool:
    return (Path(folder) / "linear.json").is_file()


def load(folder: str | Path) -> LinearModel:
    folder = Path(folder)
    try:
        meta = json.loads((folder / "linear.json").read_text(encoding="utf-8"))
        with np.load(folder / "linear.npz", allow_pickle=False) as arrays:
            idf, coef, intercept = arrays["idf"], arrays["coef"], arrays["intercept"]
    except (OSError, ValueError, KeyError) as e:
        raise DomainLMError(f"{folder}: not a readable linear model ({e})") from None
    if meta.get("format") != FORMAT or coef.shape != (len(meta["labels"]), len(meta["vocabulary"])):
        raise DomainLMError(f"{folder}: linear.json and linear.npz do not belong together")
    thresholds = None if meta["thresholds"] is None else np.asarray(meta["thresholds"])
    return LinearModel(
        meta["labels"],
        meta["multilabel"],
        meta["analyzer"],
        tuple(meta["ngram_range"]),
        meta["classifier"],
        meta["C"],
        meta["vocabulary"],
        idf,
        coef,
        intercept,
        thresholds,
        meta.get("selection", []),
        meta.get("settings", {}),
    )


def run(
    cfg, fit_rows: Dataset, dev: Dataset, evaluated: dict[str, Dataset], labels: list[str], seed: int, folder: Writer
) -> Scored:
    """`finetune --method linear`: the floor alone, saved with its predictions like a fine-tuning run (its
    metrics.json and report.md come once the command has all results)."""
    model, scored = evaluate(fit_rows, dev, evaluated, labels, cfg.multilabel, cfg.best_metric, cfg.tolerant_k)
    print(
        f"{model.description}: dev {cfg.best_metric} {scored.metrics['dev'][cfg.best_metric]:.4f} "
        f"(best of {len(model.selection)} candidates, {scored.metrics['seconds']} s)"
    )
    save(model, folder, cfg)
    for name, data in scored.rows.items():
        if name != TEST_FILE:
            write_outputs(
                folder, name, data, scored.probs[name], labels, cfg.multilabel, scored.metrics[name], model.thresholds
            )
    scored.metrics = {"seed": seed, **scored.metrics}
    scored.folder = folder
    return scored


def floor_line(floor: dict, split: str, metric: str, model_value: float | None = None) -> str:
    value = floor[split][metric]
    line = (
        f"Classical floor ({floor['method']}, fitted on the same {floor['train_rows']} training rows, chosen on dev): "
        f"{split} {metric} {value:.4f}."
    )
    if model_value is not None:
        gap = 100 * (model_value - value)
        line += (
            f" The model scores {model_value:.4f}: {abs(gap):.1f} points {'above' if gap > 0 else 'below'} the floor."
            if gap
            else " The model scores the same."
        )
    return line


def beside(cfg, runs: list[Scored], labels: list[str], evaluated: str, out: Writer) -> dict:
    """The floor on the rows the transformer runs used: once (seeds share the data: the first seed's validation
    split), or once per fold, each fitted on its run's training rows and scored on its run's rows. Saved in floor/
    (floor/fold-K) with its metrics.json; the probabilities stay in memory for the blend. Returns {"summary":
    the floor's line in every report, "runs": [Scored]}."""
    folds = cfg.folds > 0
    floors = []
    for k, run in enumerate(runs if folds else runs[:1], 1):
        model, scored = evaluate(
            run.fit,
            run.rows["dev"],
            {n: d for n, d in run.rows.items() if n != "dev"},
            labels,
            cfg.multilabel,
            cfg.best_metric,
            cfg.tolerant_k,
        )
        scored.folder = out.sub(FLOOR).sub(fold_folder(k) if folds else "")
        save(model, scored.folder, cfg)
        scored.folder.write_json("metrics.json", scored.metrics)
        floors.append(scored)
    summary = {
        "method": floors[0].metrics["method"],
        "train_rows": floors[0].metrics["train_rows"],
        "selected_on": floors[0].metrics["selected_on"],
    }
    for split in ("dev", evaluated):
        if all(split in f.metrics for f in floors):
            summary[split] = (
                scalars(floors[0].metrics[split])
                if len(floors) == 1
                else {k: v["mean"] for k, v in aggregate([f.metrics[split] for f in floors]).items()}
            )
    print(floor_line(summary, evaluated, cfg.best_metric))
    return {"summary": summary, "runs": floors}
