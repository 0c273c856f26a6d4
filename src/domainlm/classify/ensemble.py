"""Fold ensembles: the K models of `finetune --folds K` as one classifier, and their out-of-fold predictions.

An ensemble folder holds ensemble.json (its member folders, relative to it, and the label map); its probabilities
are the mean of its members' (classify.runtime.EnsembleRuntime). `evaluate`, `predict`, `serve` and the console load
it like any classifier, and `export` exports each member (an ensemble of ONNX models is again an ensemble folder).

Out-of-fold (OOF) predictions: each training row scored by the one fold model that did not train on it, so that
every row is scored exactly once by a model that never saw it (oof.jsonl) - what blending, distillation and error
analysis need.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from domainlm.classify import metrics as M
from domainlm.classify.data import Dataset, targets
from domainlm.classify.ensemble_file import write_ensemble
from domainlm.classify.report import score, write_outputs
from domainlm.classify.runtime import ClassifierRuntime
from domainlm.errors import DomainLMError


def cross_validation_outputs(cfg, train: Dataset, held_out: list[np.ndarray], test: Dataset | None,
                             labels: list[str], out: Path, load: Callable[[str], ClassifierRuntime]) -> dict:
    """After the K fold runs in out/fold-k: oof.jsonl and OOF metrics, ensemble.json (out becomes a classifier
    folder), and on --test the ensemble's metrics beside the mean and std of the single folds'."""
    members = [f"fold-{k}" for k in range(1, len(held_out) + 1)]
    runtimes = [load(str(out / m)) for m in members]
    texts, pairs = train.columns()
    oof = np.full((len(train), len(labels)), np.nan, dtype=np.float32)
    fold_of = np.zeros(len(train), dtype=np.int64)
    for k, (runtime, rows) in enumerate(zip(runtimes, held_out), 1):
        if np.isfinite(oof[rows]).any():
            raise DomainLMError(f"fold {k} holds out rows another fold already scored")  # a broken split, never a silent one
        oof[rows] = runtime.predict([texts[i] for i in rows], None if pairs is None else [pairs[i] for i in rows],
                                    cfg.batch_size, cfg.max_seq_len)
        fold_of[rows] = k
    if not np.isfinite(oof).all():
        raise DomainLMError(f"{int((~np.isfinite(oof).all(axis=1)).sum())} training rows were held out by no fold")
    thresholds = M.tune_thresholds(oof, targets(train, labels, True)) if cfg.multilabel else None
    result = {"oof": score(oof, train, labels, cfg.multilabel, cfg.tolerant_k, thresholds, cfg.ordinal)}
    with open(out / "oof.jsonl", "w", encoding="utf-8") as f:
        for i, (ex, p) in enumerate(zip(train.examples, oof)):
            f.write(json.dumps({"row": i, "line": ex.line, "fold": int(fold_of[i]), "label": ex.labels if cfg.multilabel else ex.labels[0],
                                "probs": [float(x) for x in p]}, ensure_ascii=False) + "\n")
    write_ensemble(out, members, labels, cfg.multilabel, thresholds, folds=len(members), oof_rows=len(train))
    if test is not None:
        test_texts, test_pairs = test.columns()
        per_fold = [r.predict(test_texts, test_pairs, cfg.batch_size, cfg.max_seq_len) for r in runtimes]
        probs = np.mean(per_fold, axis=0)
        singles = [score(p, test, labels, cfg.multilabel, cfg.tolerant_k, r.thresholds if cfg.multilabel else None, cfg.ordinal)
                   for p, r in zip(per_fold, runtimes)]
        ensemble = score(probs, test, labels, cfg.multilabel, cfg.tolerant_k, thresholds, cfg.ordinal)
        write_outputs(out, "test", test, probs, labels, cfg.multilabel, ensemble, thresholds)
        result["test_file"] = {"ensemble": ensemble, "single_folds": M.aggregate(singles),
                               "per_fold": [M.scalars(s) for s in singles]}
    return result


def summary_lines(result: dict, metric: str) -> list[str]:
    lines = ["", f"Out-of-fold predictions (oof.jsonl, every training row once): {metric} "
                 f"{result['oof'][metric]:.4f} on {result['oof']['n']} rows."]
    if "test_file" in result:
        t = result["test_file"]
        single = t["single_folds"][metric]
        lines += ["", f"## --test ({t['ensemble']['n']} rows): the fold ensemble against the single folds", "",
                  "| model | " + metric + " |", "| --- | --- |",
                  f"| ensemble of {len(t['per_fold'])} folds (mean probabilities) | {t['ensemble'][metric]:.4f} |",
                  f"| single fold, mean +- std | {single['mean']:.4f} +- {single['std']:.4f} |"]
    return lines
