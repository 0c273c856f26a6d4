"""Fold ensembles: the K models of `finetune --folds K` as one classifier, and their out-of-fold predictions.

An ensemble folder holds ensemble.json (its member folders, relative to it, and the label map); its probabilities
are the mean of its members'. `evaluate`, `predict`, `serve` and the console load it like any classifier, and
`export` exports each member (an ensemble of ONNX models is again an ensemble folder).

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
from domainlm.errors import DomainLMError
from domainlm.serve.runtime import Runtime

ENSEMBLE_FILE = "ensemble.json"


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def write_ensemble(folder: Path, members: list[str], labels: list[str], multilabel: bool,
                   thresholds: np.ndarray | None = None, **extra) -> None:
    meta = {"kind": "mean of member probabilities", "members": members, "labels": labels, "multilabel": multilabel,
            **extra}
    if thresholds is not None:
        meta["thresholds"] = [float(t) for t in thresholds]
    (folder / ENSEMBLE_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")


def read_ensemble(path: str | Path) -> dict:
    where = Path(path) / ENSEMBLE_FILE
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
        members, labels = meta["members"], meta["labels"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DomainLMError(f"{where}: not a readable ensemble file ({e})") from None
    if not members or not isinstance(members, list):
        raise DomainLMError(f"{where}: lists no members")
    missing = [m for m in members if not (Path(path) / m).exists()]
    if missing:
        raise DomainLMError(f"{where}: member folder(s) {', '.join(missing)} do not exist")
    if not isinstance(labels, list) or not labels:
        raise DomainLMError(f"{where}: lists no labels")
    return meta


class EnsembleRuntime(Runtime):
    """The mean of the members' probabilities. Members of one fine-tuning run share a tokenizer: a batch is encoded
    once and each member scores it (the serve path); `predict` lets each member encode for itself, so that any
    members (linear floors included) can be averaged."""

    def __init__(self, path: str, load: Callable[[str], Runtime]):
        meta = read_ensemble(path)
        self.members = [load(str(Path(path) / m)) for m in meta["members"]]
        for name, member in zip(meta["members"], self.members):
            if member.labels != meta["labels"] or member.multilabel != bool(meta.get("multilabel")):
                raise DomainLMError(f"{Path(path) / name}: its labels ({', '.join(member.labels)}) differ from the "
                                    f"ensemble's ({', '.join(meta['labels'])})")
        first = self.members[0]
        self.kind = f"ensemble of {len(self.members)} {first.kind}"
        self.config = getattr(first, "config", None)
        tokenizers = [m.tokenizer for m in self.members]
        shared = all(t is not None for t in tokenizers) and all(t.get_vocab() == tokenizers[0].get_vocab() for t in tokenizers)
        self.shared_tokenizer = shared
        super().__init__(first.tokenizer if shared else None, meta, getattr(first, "max_seq_len", 128))

    def predict(self, texts, pairs=None, batch_size: int = 64, max_seq_len: int | None = None,
                progress: bool = False) -> np.ndarray:
        return np.mean([m.predict(texts, pairs, batch_size, max_seq_len, progress) for m in self.members], axis=0)

    def member_probs(self, texts, pairs=None, batch_size: int = 64, max_seq_len: int | None = None) -> list[np.ndarray]:
        return [m.predict(texts, pairs, batch_size, max_seq_len) for m in self.members]

    def probs_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        if not self.shared_tokenizer:
            raise DomainLMError("this ensemble's members do not share one tokenizer: it predicts through predict() only")
        return np.mean([m.probs_batch(batch) for m in self.members], axis=0)


def cross_validation_outputs(cfg, train: Dataset, held_out: list[np.ndarray], test: Dataset | None,
                             labels: list[str], out: Path, load: Callable[[str], Runtime], score) -> dict:
    """After the K fold runs in out/fold-k: oof.jsonl and OOF metrics, ensemble.json (out becomes a classifier
    folder), and on --test the ensemble's metrics beside the mean and std of the single folds'."""
    from domainlm.classify.command import write_outputs  # the one writer of prediction files

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
