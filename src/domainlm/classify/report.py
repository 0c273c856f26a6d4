"""What every classifier run reports, written in one place for finetune, the linear floor, evaluate, the sweep and
export: the metrics of a split (`score`), its predictions and bad cases (`write_outputs`), the report
(`report_markdown`), and the files of a run (`write_run`) and of several (`write_summary`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from domainlm.classify import metrics as M
from domainlm.classify.data import Dataset, targets
from domainlm.classify.metrics import best_k, choose, thresholds_of
from domainlm.outputs import Writer


def score(
    probs: np.ndarray,
    data: Dataset,
    labels: list[str],
    multilabel: bool,
    tolerant_k: int,
    thresholds: np.ndarray | None = None,
    ordinal: bool = False,
) -> dict:
    gold = targets(data, labels, multilabel)
    groups = [ex.group or "" for ex in data.examples] if any(ex.group for ex in data.examples) else None
    if multilabel:
        return M.multilabel_metrics(probs, gold, labels, thresholds_of(len(labels), thresholds), groups)
    return M.multiclass_metrics(probs, gold, labels, tolerant_k, groups, ordinal)


def write_outputs(
    out: Writer,
    name: str,
    data: Dataset,
    probs: np.ndarray,
    labels: list[str],
    multilabel: bool,
    metrics: dict,
    thresholds: np.ndarray | None,
) -> None:
    """<name>_predictions.jsonl (every row) and <name>_bad_cases.jsonl (wrong ones, with scores), and the
    confusion matrix as a picture."""
    preds, bad = [], []
    for ex, p, chosen, best in zip(data.examples, probs, choose(probs, multilabel, thresholds), best_k(probs, 5)):
        predicted = [labels[j] for j in chosen]
        row = {
            "line": ex.line,
            "text": ex.text,
            "gold": ex.labels,
            "predicted": predicted,
            "scores": {labels[j]: round(float(p[j]), 4) for j in best},
        }
        if ex.group:
            row["group"] = ex.group
        preds.append(json.dumps(row, ensure_ascii=False) + "\n")
        if sorted(predicted) != sorted(ex.labels):
            bad.append(preds[-1])
    out.write_text(f"{name}_predictions.jsonl", "".join(preds))
    out.write_text(f"{name}_bad_cases.jsonl", "".join(bad))
    if "confusion_matrix" in metrics:
        png = out.file(f"{name}_confusion.png")
        with out.writing(png.name):
            M.confusion_png(metrics["confusion_matrix"], labels, png)


def read_correctness(path: Path) -> tuple[np.ndarray, list[int]]:
    """Per-row correctness (1.0 where the predicted labels equal the gold ones) of a <name>_predictions.jsonl, and
    the rows' input lines: what the paired tests compare."""
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return np.asarray([sorted(r["predicted"]) == sorted(r["gold"]) for r in rows], dtype=float), [
        r["line"] for r in rows
    ]


def report_markdown(title: str, sections: dict[str, dict], labels: list[str]) -> str:
    lines = [f"# {title}", ""]
    for name, m in sections.items():
        lines += [f"## {name} ({m.get('n', '?')} rows)", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in M.scalars(m).items()]
        lines += ["", "| class | precision | recall | f1 | support |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
            for c, v in m["per_class"].items()
        ]
        if "per_group" in m:
            keys = [k for k in next(iter(m["per_group"].values())) if k != "n"]
            lines += ["", "| group | n | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 2) + "|"]
            lines += [
                f"| {g} | {v['n']} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |"
                for g, v in m["per_group"].items()
            ]
        if "confusion_matrix" in m:
            lines += [
                "",
                "Confusion matrix (rows gold, columns predicted):",
                "",
                "| | " + " | ".join(labels) + " |",
                "| --- " * (len(labels) + 1) + "|",
            ]
            lines += [
                f"| {labels[i]} | " + " | ".join(map(str, row)) + " |" for i, row in enumerate(m["confusion_matrix"])
            ]
        lines.append("")
    return "\n".join(lines)


def write_run(
    out: Writer, metrics: dict, title: str, sections: dict[str, dict], labels: list[str], lines: list[str] = ()
) -> None:
    """metrics.json (everything measured) and report.md (the tables of `sections`, then `lines`) of one run,
    each written once, when the run's results are all in."""
    out.write_json("metrics.json", metrics)
    text = report_markdown(title, sections, labels)
    out.write_text("report.md", text + "".join(f"\n{line}\n" for line in lines))


def write_summary(out: Writer, summary: dict, kind: str, floor_line: str | None, extra: list[str] = ()) -> None:
    """summary.json and summary.md of several runs (seeds or folds): mean and std of each metric."""
    out.write_json("summary.json", summary)
    lines = [
        f"# {summary['runs']} runs ({kind}), metrics on {summary['evaluated_on']}",
        "",
        "| metric | mean | std |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {k} | {v['mean']:.4f} | {v['std']:.4f} |" for k, v in summary["mean_std"].items()]
    if floor_line:
        lines += ["", floor_line]
    lines += list(extra)  # fold ensembles, out-of-fold predictions, the blend
    out.write_text("summary.md", "\n".join(lines) + "\n")
