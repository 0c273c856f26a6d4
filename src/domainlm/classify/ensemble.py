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

import numpy as np

from domainlm.classify import metrics as M
from domainlm.classify.data import Dataset, targets
from domainlm.classify.ensemble_file import write_ensemble
from domainlm.classify.report import score, write_outputs
from domainlm.classify.results import HELD_OUT, TEST_FILE, Scored, fold_folder
from domainlm.errors import DomainLMError
from domainlm.outputs import Writer


def cross_validation(
    cfg,
    train: Dataset,
    held_out: list[np.ndarray],
    runs: list[Scored],
    test: Dataset | None,
    labels: list[str],
    out: Writer,
) -> tuple[dict, dict[str, np.ndarray]]:
    """After the K fold runs (out/fold-K), from the probabilities they kept: oof.jsonl and the OOF metrics,
    ensemble.json (out becomes a classifier folder), and on --test the ensemble's metrics beside the mean and std of
    the single folds'. Returns (the summary's part, {"oof": probabilities, "test": the ensemble's on --test})."""
    oof = np.full((len(train), len(labels)), np.nan, dtype=np.float32)
    fold_of = np.zeros(len(train), dtype=np.int64)
    for k, (run, rows) in enumerate(zip(runs, held_out), 1):
        if np.isfinite(oof[rows]).any():
            raise DomainLMError(
                f"fold {k} holds out rows another fold already scored"
            )  # a broken split, never a silent one
        oof[rows] = run.probs[HELD_OUT]
        fold_of[rows] = k
    if not np.isfinite(oof).all():
        raise DomainLMError(f"{int((~np.isfinite(oof).all(axis=1)).sum())} training rows were held out by no fold")
    thresholds = M.tune_thresholds(oof, targets(train, labels, True)) if cfg.multilabel else None
    result = {"oof": score(oof, train, labels, cfg.multilabel, cfg.tolerant_k, thresholds, cfg.ordinal)}
    out.write_text(
        "oof.jsonl",
        "".join(
            json.dumps(
                {
                    "row": i,
                    "line": ex.line,
                    "fold": int(fold_of[i]),
                    "label": ex.labels if cfg.multilabel else ex.labels[0],
                    "probs": [float(x) for x in p],
                },
                ensure_ascii=False,
            )
            + "\n"
            for i, (ex, p) in enumerate(zip(train.examples, oof))
        ),
    )
    members = [fold_folder(k) for k in range(1, len(runs) + 1)]
    write_ensemble(out, members, labels, cfg.multilabel, thresholds, folds=len(members), oof_rows=len(train))
    probs = {"oof": oof}
    if test is not None:
        per_fold = [run.probs[TEST_FILE] for run in runs]
        probs["test"] = np.mean(per_fold, axis=0)
        singles = [
            score(p, test, labels, cfg.multilabel, cfg.tolerant_k, run.thresholds, cfg.ordinal)
            for p, run in zip(per_fold, runs)
        ]
        ensemble = score(probs["test"], test, labels, cfg.multilabel, cfg.tolerant_k, thresholds, cfg.ordinal)
        write_outputs(out, "test", test, probs["test"], labels, cfg.multilabel, ensemble, thresholds)
        result["test_file"] = {
            "ensemble": ensemble,
            "single_folds": M.aggregate(singles),
            "per_fold": [M.scalars(s) for s in singles],
        }
    return result, probs


def summary_lines(result: dict, metric: str) -> list[str]:
    lines = [
        "",
        f"Out-of-fold predictions (oof.jsonl, every training row once, each by the fold model that did not "
        f"train on it): {metric} {result['oof'][metric]:.4f} on {result['oof']['n']} rows.",
    ]
    if "test_file" in result:
        t = result["test_file"]
        single = t["single_folds"][metric]
        lines += [
            "",
            f"## --test ({t['ensemble']['n']} rows): the fold ensemble against the single folds",
            "",
            "| model | " + metric + " |",
            "| --- | --- |",
            f"| ensemble of {len(t['per_fold'])} folds (mean probabilities) | {t['ensemble'][metric]:.4f} |",
            f"| single fold, mean +- std | {single['mean']:.4f} +- {single['std']:.4f} |",
        ]
    return lines
