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
from domainlm.classify.report import score, write_json, write_outputs, write_run
from domainlm.errors import DomainLMError

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

        vec = TfidfVectorizer(analyzer=self.analyzer, ngram_range=self.ngram_range, sublinear_tf=True,
                              vocabulary={t: i for i, t in enumerate(self.vocabulary)})
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


def _fit_weights(x, y: np.ndarray, kind: str, c: float, n_labels: int, multilabel: bool) -> tuple[np.ndarray, np.ndarray]:
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
    coef, intercept = np.zeros((n_labels, x.shape[1])), np.full(n_labels, -1e4)  # labels absent from training: never chosen
    if len(present) == 2:  # one weight vector w: softmax([-w/2, w/2]) equals sigmoid(w)
        coef[present[0]], coef[present[1]] = -est.coef_[0] / 2, est.coef_[0] / 2
        intercept[present[0]], intercept[present[1]] = -est.intercept_[0] / 2, est.intercept_[0] / 2
    else:
        coef[present], intercept[present] = est.coef_, est.intercept_
    return coef, intercept


def fit(train: Dataset, dev: Dataset, labels: list[str], multilabel: bool, metric: str, tolerant_k: int = 2) -> LinearModel:
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
                    raise DomainLMError(f"--metric {metric!r} is not computed; choose one of "
                                        f"{', '.join(k for k, v in m.items() if isinstance(v, float))}")
                selection.append({"analyzer": analyzer, "ngram_range": list(ngrams), "classifier": kind, "C": c,
                                  f"dev_{metric}": round(float(m[metric]), 6)})
                if m[metric] > best_value:
                    best_value = m[metric]
                    best = LinearModel(labels, multilabel, analyzer, ngrams, kind, c, vec.get_feature_names_out().tolist(),
                                       vec.idf_.copy(), coef, intercept)
                    best_probs = probs
    best.selection = selection
    if multilabel:
        best.thresholds = tune_thresholds(best_probs, dev_gold)
    return best


def evaluate(train: Dataset, dev: Dataset, test: Dataset | None, labels: list[str], multilabel: bool, metric: str,
             tolerant_k: int = 2) -> tuple[LinearModel, dict]:
    """Fit the floor and score it on dev (and test) with the same metric functions as the transformer."""
    start = time.perf_counter()
    model = fit(train, dev, labels, multilabel, metric, tolerant_k)
    result = {"method": model.description, "train_rows": len(train), "selected_on": f"dev {metric}",
              "dev": score(model.scores(dev), dev, labels, multilabel, tolerant_k, model.thresholds)}
    if test is not None:
        result["test"] = score(model.scores(test), test, labels, multilabel, tolerant_k, model.thresholds)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return model, result


def save(model: LinearModel, folder: str | Path, cfg=None) -> None:
    """cfg (a FinetuneConfig): its inference settings are saved too, but max_seq_len (the floor reads no tokens)."""
    if cfg is not None:
        model.settings = {k: v for k, v in cfg.inference_settings().items() if k != "max_seq_len"}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": 1, "labels": model.labels, "multilabel": model.multilabel,
            "analyzer": model.analyzer, "ngram_range": list(model.ngram_range), "classifier": model.classifier,
            "C": model.C, "description": model.description,
            "thresholds": None if model.thresholds is None else [float(t) for t in model.thresholds],
            "selection": model.selection, "settings": model.settings, "vocabulary": model.vocabulary}
    np.savez(folder / "linear.npz", idf=model.idf, coef=model.coef, intercept=model.intercept)
    (folder / "linear.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")


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
    return LinearModel(meta["labels"], meta["multilabel"], meta["analyzer"], tuple(meta["ngram_range"]), meta["classifier"],
                       meta["C"], meta["vocabulary"], idf, coef, intercept, thresholds, meta.get("selection", []),
                       meta.get("settings", {}))


def run(cfg, train: Dataset, dev: Dataset, test: Dataset | None, labels: list[str], seed: int, out: Path) -> dict:
    """`finetune --method linear`: the floor alone, saved and reported like a fine-tuning run."""
    out.mkdir(parents=True, exist_ok=True)
    model, result = evaluate(train, dev, test, labels, cfg.multilabel, cfg.best_metric, cfg.tolerant_k)
    print(f"{model.description}: dev {cfg.best_metric} {result['dev'][cfg.best_metric]:.4f} "
          f"(best of {len(model.selection)} candidates, {result['seconds']} s)")
    save(model, out, cfg)
    result = {"seed": seed, **result}
    write_outputs(out, "dev", dev, model.scores(dev), labels, cfg.multilabel, result["dev"], model.thresholds)
    if test is not None:
        write_outputs(out, "test", test, model.scores(test), labels, cfg.multilabel, result["test"], model.thresholds)
    sections = {k: result[k] for k in ("dev", "test") if k in result}
    write_run(out, result, f"Linear floor: {model.description}", sections, labels)
    return result


def floor_line(floor: dict, split: str, metric: str, model_value: float | None = None) -> str:
    value = floor[split][metric]
    line = (f"Classical floor ({floor['method']}, fitted on the same {floor['train_rows']} training rows, chosen on dev): "
            f"{split} {metric} {value:.4f}.")
    if model_value is not None:
        gap = 100 * (model_value - value)
        line += (f" The model scores {model_value:.4f}: {abs(gap):.1f} points "
                 f"{'above' if gap > 0 else 'below'} the floor." if gap else " The model scores the same.")
    return line


def floor_beside(cfg, splits: list[tuple], labels: list[str], evaluated: str, out: Path, single: bool) -> dict:
    """The floor on the rows the transformer runs used: once (seeds share the data; the first seed's validation
    split), or once per fold. Written to floor/ and, for a single run, into metrics.json and report.md."""
    folds = cfg.folds > 0
    results = []
    for i, (fit_rows, dev, test) in enumerate(splits if folds else splits[:1]):
        model, result = evaluate(fit_rows, dev, test, labels, cfg.multilabel, cfg.best_metric, cfg.tolerant_k)
        folder = out / "floor" / (f"fold-{i + 1}" if folds else "")
        save(model, folder, cfg)
        write_json(folder / "metrics.json", result)
        results.append(result)
    floor = {"method": results[0]["method"], "train_rows": results[0]["train_rows"], "selected_on": results[0]["selected_on"]}
    for split in ("dev", "test"):
        if all(split in r for r in results):
            floor[split] = (scalars(results[0][split]) if len(results) == 1 else
                            {k: v["mean"] for k, v in aggregate([r[split] for r in results]).items()})
    if single and (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        metrics["floor"] = floor
        write_json(out / "metrics.json", metrics)
        line = floor_line(floor, evaluated, cfg.best_metric, metrics.get(evaluated, {}).get(cfg.best_metric))
        with open(out / "report.md", "a", encoding="utf-8") as f:
            f.write("\n" + line + "\n")
    print(floor_line(floor, evaluated, cfg.best_metric))
    return floor
