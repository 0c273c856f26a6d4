"""Models side by side: what each was trained with (method, LoRA rank, learning rate, epochs, base, data), its
metrics, its curves, the classical floor fitted beside it, and, for two configurations, the paired test over
their seeds and test rows (the sweep's two-level test). Everything is read from the run folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from domainlm.console.catalog import read_json, run_config
from domainlm.console.db import Model
from domainlm.train.logging import read_log

SETTINGS = ("method", "LoRA rank", "learning rate", "epochs", "batch size", "max seq len", "seed", "base", "data")


def run_folder(home: Path, m: Model) -> Path:
    """The finetune run that produced a classifier (its model/ folder's parent; a linear model is its run)."""
    path = home / m.path
    return path if m.kind == "linear" else path.parent


def method_label(method: str | None, rank) -> str:
    if not method:
        return ""
    return f"LoRA r{rank}" if method == "lora" else method


def settings(home: Path, m: Model, names: dict[str, str] | None = None) -> dict:
    """What a model was trained with, by the names of SETTINGS ("" where it does not apply: a linear model has no
    learning rate, epochs, batch or length). `names`: folder -> name of my models, to name a base as the user does."""
    if m.kind in ("classifier", "linear"):
        run = run_folder(home, m)
        c = run_config(run)
        seed = run.name[5:] if run.name.startswith("seed-") else ",".join(map(str, c.get("seeds", [])))
        base = c.get("model") or ""
        if c.get("method") == "linear" or m.kind == "linear":
            return {
                **dict.fromkeys(SETTINGS, ""),
                "method": "linear",
                "seed": seed,
                "data": Path(c.get("train") or "").name,
            }
        return {
            "method": c.get("method", ""),
            "LoRA rank": c.get("lora_rank", "") if c.get("method") == "lora" else "",
            "learning rate": c.get("learning_rate", ""),
            "epochs": c.get("epochs", ""),
            "batch size": c.get("batch_size", ""),
            "max seq len": c.get("max_seq_len", ""),
            "seed": seed,
            "base": _short(base, names),
            "data": Path(c.get("train") or "").name,
        }
    job = m.job
    c = job.config if job is not None else {}
    if job is not None and job.command == "pretrain":
        return {
            "method": "MLM + SOP" if c.get("binary_head", True) else "MLM",
            "LoRA rank": "",
            "learning rate": c.get("learning_rate", c.get("max_lr", "")),
            "epochs": f"{c.get('max_steps', '')} steps",
            "batch size": c.get("batch_size", c.get("micro_batch_size", "")),
            "max seq len": c.get("max_seq_len", ""),
            "seed": c.get("seed", ""),
            "base": _short(c.get("model", ""), names),
            "data": Path(c.get("corpus") or "").name,
        }
    return dict.fromkeys(SETTINGS, "")


def _short(path: str, names: dict[str, str] | None = None) -> str:
    """One of my models by its name; else a folder's last part (a hub name as it is)."""
    if names and str(Path(str(path)).resolve()) in names and "/" in str(path):
        return names[str(Path(str(path)).resolve())]
    return Path(str(path)).name if "/" in str(path) else str(path)


def model_names(s, home: Path) -> dict[str, str]:
    return {str((home / m.path).resolve()): m.name for m in s.query(Model)}


def curves(home: Path, m: Model) -> dict:
    """Validation metric and training loss by step: a classifier's run log, a snapshot's pretraining log."""
    if m.kind in ("classifier", "linear"):
        log, metric = run_folder(home, m) / "log.jsonl", run_config(run_folder(home, m)).get("metric") or "accuracy"
    elif m.job is not None:
        log, metric = home / m.job.folder / "log.jsonl", "mlm_acc"
    else:
        return {"metric": [], "loss": [], "name": ""}
    rows = read_log(log) if log.is_file() else []
    upto = m.step if m.kind in ("snapshot",) and m.step else None
    keep = [r for r in rows if upto is None or r["step"] <= upto]
    return {
        "name": metric,
        "metric": [[r["step"], r[metric]] for r in keep if r["split"] == "valid" and metric in r],
        "loss": [[r["step"], r["loss"]] for r in keep if r["split"] == "train" and "loss" in r],
    }


def floor(home: Path, m: Model) -> dict | None:
    """The classical floor fitted on the same rows (finetune's floor/, or the sweep's), scored on the same split."""
    if m.kind != "classifier":
        return None
    run = run_folder(home, m)
    candidates = [run / "floor", run.parent / "floor"]
    if m.job is not None:
        candidates.append(home / m.job.folder / "floor")
    for folder in candidates:
        metrics = read_json(folder / "metrics.json")
        split = "test" if "test" in metrics else "dev" if "dev" in metrics else None
        if split:
            values = {k: v for k, v in metrics[split].items() if isinstance(v, float)}
            return {"split": split, "method": metrics.get("method", "TF-IDF + linear"), "metrics": values}
    return None


def _group(home: Path, m: Model) -> tuple[Path, list[Path]]:
    """The configuration a model belongs to and every seed run of it (seed-N siblings), for the paired test."""
    run = run_folder(home, m)
    if run.name.startswith("seed-"):
        return run.parent, sorted(p for p in run.parent.glob("seed-*") if p.is_dir())
    return run, [run]


def _correct(run: Path) -> tuple[np.ndarray, list[int]] | None:
    metrics = read_json(run / "metrics.json")
    split = "test" if "test" in metrics else "dev"
    path = run / f"{split}_predictions.jsonl"
    if not path.is_file():
        return None
    from domainlm.classify.report import read_correctness

    return read_correctness(path)


def paired_test(home: Path, a: Model, b: Model) -> dict | None:
    """a against b over every seed of each configuration, on the same rows (None where the rows differ)."""
    from domainlm.stats import compare

    groups = [_group(home, m) for m in (a, b)]
    if groups[0][0] == groups[1][0]:
        return None  # seeds of one configuration: nothing to test between them
    arrays = []
    for _, runs in groups:
        found = [r for r in (_correct(run) for run in runs) if r is not None]
        if not found or any(f[1] != found[0][1] for f in found):
            return None
        arrays.append(found)
    if arrays[0][0][1] != arrays[1][0][1]:
        return None
    result = compare(np.stack([f[0] for f in arrays[0]]), np.stack([f[0] for f in arrays[1]]))
    return {"a": a.name, "b": b.name, **result}


def table(s, home: Path, ids: list[int], summary) -> dict:
    """The compare page and API: settings, metrics (best marked, the floors included), floors, curves, the paired
    tests (two models: one test; more: each against the first, Holm-adjusted), Markdown."""
    from domainlm.stats import holm
    from domainlm.sweep.report import markdown_table

    models = [m for m in (s.get(Model, i) for i in ids) if m is not None]
    keys = sorted({k for m in models for k in m.metrics}, key=lambda k: (not k.startswith("test"), k))
    names = model_names(s, home)
    configs = [settings(home, m, names) for m in models]
    floors = [floor(home, m) for m in models]
    first = keys[0] if keys else ""
    split, metric = (first.split(" ", 1) + [""])[:2] if first else ("", "")
    floor_values = [f["metrics"].get(metric) if f and f["split"] == split else None for f in floors]
    header = ["model", "kind", "job", "step", *SETTINGS, *keys, "floor", "size MB"]
    rows = []
    for m, c, f in zip(models, configs, floors):
        floor_text = f"{f['metrics'][metric]:.4f} ({f['split']})" if f and metric in f["metrics"] else ""
        rows.append(
            [
                m.name,
                m.kind,
                str(m.job_id or ""),
                str(m.step or ""),
                *[str(c[k]) for k in SETTINGS],
                *[f"{m.metrics[k]:.4f}" if k in m.metrics else "" for k in keys],
                floor_text,
                f"{m.size_bytes / 1e6:.1f}",
            ]
        )
    best = {}
    for k in keys:
        values = [m.metrics[k] for m in models if k in m.metrics]
        if k == first:  # the floor beside a model competes for "best" too: a model below it is not worth shipping
            values += [v for v in floor_values if v is not None]
        if values:
            best[k] = (min if "loss" in k else max)(values)
    tests, untested = [], []
    classifiers = [m for m in models if m.kind == "classifier"]
    for other in classifiers[1:]:
        result = paired_test(home, classifiers[0], other)
        (tests if result else untested).append(result or {"a": classifiers[0].name, "b": other.name})
    if len(tests) > 1:
        for t, adjusted in zip(tests, holm([t["p_value"] for t in tests])):
            t["p_holm"] = float(adjusted)
    markdown = markdown_table(header, rows)
    for t in tests:
        markdown += (
            f"\n\nPaired test, {t['a']} vs {t['b']}: difference {100 * t['difference']:+.1f} points, "
            f"one-sided p = {t['p_value']:.3g}"
            + (f" (Holm-adjusted {t['p_holm']:.3g})" if "p_holm" in t else "")
            + f" ({t['seeds'][0]} vs {t['seeds'][1]} seeds, {t['rows']} rows)"
        )
    return {
        "header": header,
        "rows": rows,
        "metrics": keys,
        "best": best,
        "settings": configs,
        "setting_names": SETTINGS,
        "floors": floors,
        "floor_values": floor_values,
        "floor_metric": first,
        "curves": [curves(home, m) for m in models],
        "test": tests[0] if len(models) == 2 and tests else None,
        "tests": tests,
        "untested": untested,
        "models": [summary(m) for m in models],
        "markdown": markdown,
    }


def per_class(home: Path, m: Model) -> dict | None:
    """A classifier's per-label view on its test split (else dev): precision, recall, F1 and support of each label,
    and the confusion matrix (rows: gold, columns: predicted), from the run's metrics.json."""
    if m.kind not in ("classifier", "linear"):
        return None
    run = run_folder(home, m)
    metrics = read_json(run / "metrics.json")
    split = next((s for s in ("test", "dev") if "per_class" in metrics.get(s, {})), None)
    if split is None:
        return None
    part = metrics[split]
    labels = list(part["per_class"])
    matrix = part.get("confusion_matrix")
    rows = [{"label": label, **part["per_class"][label]} for label in labels]
    png = f"{split}_confusion.png" if (run / f"{split}_confusion.png").is_file() else None
    return {
        "split": split,
        "labels": labels,
        "rows": rows,
        "matrix": matrix,
        "max": max((v for row in matrix for v in row), default=0) if matrix else 0,
        "png": png,
    }
