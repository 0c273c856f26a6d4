"""Models side by side: what each was trained with (method, LoRA rank, learning rate, epochs, base, data), its
metrics, its curves, the classical floor fitted beside it, and, for two configurations, the paired test over
their seeds and test rows (the sweep's two-level test). Everything is read from the run folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from domainlm.console.catalog import read_json
from domainlm.console.db import Model
from domainlm.train.logging import read_log

SETTINGS = ("method", "LoRA rank", "learning rate", "epochs", "batch size", "max seq len", "seed", "base", "data")


def run_folder(home: Path, m: Model) -> Path:
    """The finetune run that produced a classifier (its model/ folder's parent; a linear model is its run)."""
    path = home / m.path
    return path if m.kind == "linear" else path.parent


def _run_config(run: Path) -> dict:
    for folder in (run, run.parent):  # one run, or seed-N inside a run with several seeds
        if (folder / "config.yaml").is_file():
            try:
                return yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                return {}
    return {}


def method_label(method: str | None, rank) -> str:
    if not method:
        return ""
    return f"LoRA r{rank}" if method == "lora" else method


def settings(home: Path, m: Model) -> dict:
    """What a model was trained with, by the names of SETTINGS ("" where it does not apply)."""
    if m.kind in ("classifier", "linear"):
        run = run_folder(home, m)
        c = _run_config(run)
        seed = run.name[5:] if run.name.startswith("seed-") else ",".join(map(str, c.get("seeds", [])))
        base = c.get("model") or ""
        return {"method": c.get("method", ""), "LoRA rank": c.get("lora_rank", "") if c.get("method") == "lora" else "",
                "learning rate": c.get("learning_rate", ""), "epochs": c.get("epochs", ""), "batch size": c.get("batch_size", ""),
                "max seq len": c.get("max_seq_len", ""), "seed": seed, "base": _short(base),
                "data": Path(c.get("train") or "").name}
    job = m.job
    c = job.config if job is not None else {}
    if job is not None and job.command == "pretrain":
        return {"method": "MLM + SOP" if c.get("binary_head", True) else "MLM", "LoRA rank": "",
                "learning rate": c.get("learning_rate", c.get("max_lr", "")), "epochs": f"{c.get('max_steps', '')} steps",
                "batch size": c.get("batch_size", c.get("micro_batch_size", "")),
                "max seq len": c.get("max_seq_len", ""), "seed": c.get("seed", ""), "base": _short(c.get("model", "")),
                "data": Path(c.get("corpus") or "").name}
    return dict.fromkeys(SETTINGS, "")


def _short(path: str) -> str:
    return Path(str(path)).name if "/" in str(path) else str(path)


def curves(home: Path, m: Model) -> dict:
    """Validation metric and training loss by step: a classifier's run log, a snapshot's pretraining log."""
    if m.kind in ("classifier", "linear"):
        log, metric = run_folder(home, m) / "log.jsonl", _run_config(run_folder(home, m)).get("metric") or "accuracy"
    elif m.job is not None:
        log, metric = home / m.job.folder / "log.jsonl", "mlm_acc"
    else:
        return {"metric": [], "loss": [], "name": ""}
    rows = read_log(log) if log.is_file() else []
    upto = m.step if m.kind in ("snapshot",) and m.step else None
    keep = [r for r in rows if upto is None or r["step"] <= upto]
    return {"name": metric,
            "metric": [[r["step"], r[metric]] for r in keep if r["split"] == "valid" and metric in r],
            "loss": [[r["step"], r["loss"]] for r in keep if r["split"] == "train" and "loss" in r]}


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
    """The compare page and API: settings, metrics (best marked), floors, curves, the paired test, Markdown."""
    from domainlm.sweep.report import markdown_table

    models = [m for m in (s.get(Model, i) for i in ids) if m is not None]
    keys = sorted({k for m in models for k in m.metrics}, key=lambda k: (not k.startswith("test"), k))
    configs = [settings(home, m) for m in models]
    floors = [floor(home, m) for m in models]
    header = ["model", "kind", "job", "step", *SETTINGS, *keys, "floor", "size MB"]
    rows = []
    for m, c, f in zip(models, configs, floors):
        first = keys[0].split(" ", 1)[1] if keys else ""
        floor_text = f"{f['metrics'][first]:.4f} ({f['split']})" if f and first in f["metrics"] else ""
        rows.append([m.name, m.kind, str(m.job_id or ""), str(m.step or ""), *[str(c[k]) for k in SETTINGS],
                     *[f"{m.metrics[k]:.4f}" if k in m.metrics else "" for k in keys], floor_text, f"{m.size_bytes / 1e6:.1f}"])
    best = {}
    for k in keys:
        values = [m.metrics[k] for m in models if k in m.metrics]
        if values:
            best[k] = (min if "loss" in k else max)(values)
    test = paired_test(home, models[0], models[1]) if len(models) == 2 and all(m.kind == "classifier" for m in models) else None
    markdown = markdown_table(header, rows)
    if test:
        markdown += (f"\n\nPaired test, {test['a']} vs {test['b']}: difference {100 * test['difference']:+.1f} points, "
                     f"one-sided p = {test['p_value']:.3g} ({test['seeds'][0]} vs {test['seeds'][1]} seeds, {test['rows']} rows)")
    return {"header": header, "rows": rows, "metrics": keys, "best": best, "settings": configs, "setting_names": SETTINGS,
            "floors": floors, "curves": [curves(home, m) for m in models], "test": test,
            "models": [summary(m) for m in models], "markdown": markdown}

