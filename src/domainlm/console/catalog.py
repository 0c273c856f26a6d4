"""What a job's run folder says: progress and curves (log.jsonl), the models it produced, its headline metric.

The run folder is the only source: the console reads what `domainlm pretrain | finetune | prepare` wrote.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

from domainlm.classify.metrics import scalars
from domainlm.console.db import Dataset, Job, Model
from domainlm.train.logging import read_log

LINEAR_FILES = ("linear.json", "linear.npz")  # what `finetune --method linear` saves (classify/linear.py)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def run_logs(folder: Path) -> list[Path]:
    """log.jsonl of a run, or of each seed / fold run inside it."""
    found = sorted(folder.glob("seed-*/log.jsonl")) + sorted(folder.glob("fold-*/log.jsonl"))
    return found or ([folder / "log.jsonl"] if (folder / "log.jsonl").is_file() else [])


def find_jobs(session, status: str = "", q: str = "") -> list[Job]:
    """Jobs newest first, of one status and/or whose name, description or type contains q."""
    query = session.query(Job).order_by(Job.id.desc())
    if status:
        query = query.filter(Job.status == status)
    if q.strip():
        like = f"%{q.strip()}%"
        query = query.filter(Job.name.ilike(like) | Job.description.ilike(like) | Job.command.ilike(like))
    return query.all()


def total_steps(job: Job, train_rows: int | None) -> int | None:
    c = job.config
    if job.command == "pretrain":
        return int(c["max_steps"])
    if job.command == "finetune" and train_rows:
        if c.get("method") == "linear":
            return None  # no steps: one fit
        fit = train_rows * (c["folds"] - 1) / c["folds"] if c["folds"] else train_rows
        held_out = 0 if c.get("dev") else max(1, round(c["valid_ratio"] * fit))
        held_out = min(held_out, c["valid_max_rows"]) if c.get("valid_max_rows") else held_out
        runs = c["folds"] or len(c["seeds"])
        batch = c.get("global_batch_size") or c["batch_size"] * max(1, job.processes or 1)  # torchrun: one each
        return runs * c["epochs"] * math.ceil(max(1, fit - held_out) / batch)
    return None


def steps_done(job: Job, folder: Path) -> int:
    """The steps its run logs reached (summed over seed / fold runs); a sweep: its cells finished or failed."""
    if job.command == "sweep":
        cells = folder / "cells"
        return sum(1 for _ in cells.glob("*/*/seed-*/DONE")) + sum(1 for _ in cells.glob("*/*/seed-*/FAILED"))
    return sum(max((r["step"] for r in read_log(log)), default=0) for log in run_logs(folder))


def progress(job: Job, folder: Path, train_rows: int | None, now: datetime) -> dict:
    """Steps done of the total (a sweep: cells), share, and an ETA from this attempt's pace (None where unknown).

    An earlier attempt's log is not this attempt's progress: fine-tuning and distillation start over (their log is
    rewritten once the new attempt logs), so until then they are at 0; pretraining resumes from its checkpoint and a
    sweep keeps its finished cells, so they count from where the attempt began (`progress_base`)."""
    logs = run_logs(folder)
    done = steps_done(job, folder)
    total = job.config.get("cells") if job.command == "sweep" else total_steps(job, train_rows)
    if job.status == "succeeded":
        return {"steps": done, "total": total or done, "fraction": 1.0, "eta_s": 0}
    started = job.started_at.replace(tzinfo=timezone.utc).timestamp() if job.started_at else None
    earlier = job.attempts > 0 and (
        job.status == "queued"
        or (job.status == "running" and started is not None and logs and all(p.stat().st_mtime < started for p in logs))
    )
    restarts = job.command not in ("pretrain", "sweep")
    if earlier and restarts:
        done = 0
    fraction = min(1.0, done / total) if total else None
    eta = None
    base = 0 if restarts else job.progress_base
    if job.status == "running" and fraction and job.started_at and not earlier and done > base:
        elapsed = (now - job.started_at).total_seconds()
        eta = round(elapsed * (total - done) / (done - base))
    return {"steps": done, "total": total, "fraction": fraction, "eta_s": eta}


def curves(folder: Path) -> dict:
    """{run: {split: [{step, ...metrics}]}} for the job page's charts."""
    out = {}
    for log in run_logs(folder):
        name = log.parent.name if log.parent != folder else "run"
        rows = read_log(log)
        out[name] = {split: [r for r in rows if r["split"] == split] for split in sorted({r["split"] for r in rows})}
    return out


def headline(job: Job, folder: Path) -> dict | None:
    """The metric a notification and the jobs list show: fine-tuning's best metric, pretraining's MLM accuracy; with
    `floor`, what the classical floor fitted beside it scored on the same rows (a model below it is not worth it)."""
    found = _headline(job, folder)  # name (as text), value, and the parts of the name a page translates
    if found is not None and job.command in ("finetune", "distill", "sweep") and "split" in found:
        value = floor_score(job, folder, found["metric"], found["split"])
        if value is not None:
            found["floor"] = round(value, 4)
    return found


def floor_score(job: Job, folder: Path, metric: str, split: str) -> float | None:
    """The floor's `metric` on `split`: finetune's floor/ (one per run, or beside the seeds), the sweep's results,
    distillation's table."""
    if job.command == "sweep":
        floor = read_json(folder / "results.json").get("floor") or {}
        return floor.get(split, {}).get(metric)
    if job.command == "distill":
        return read_json(folder / "distill.json").get("models", {}).get("floor", {}).get("mean")
    for candidate in (folder / "floor", *sorted(folder.glob("seed-*/floor")), *sorted(folder.glob("fold-*/floor"))):
        value = read_json(candidate / "metrics.json").get(split, {}).get(metric)
        if isinstance(value, float):
            return value
    return None


def _headline(job: Job, folder: Path) -> dict | None:
    if job.command in ("finetune", "distill"):
        name = job.config.get("metric") or ("f1_micro" if job.config.get("task") == "multilabel" else "accuracy")
        summary = read_json(folder / "summary.json")
        if summary.get("mean_std", {}).get(name):
            return {
                "name": f"{name} ({summary['evaluated_on']}, mean of {summary['runs']})",
                "value": round(summary["mean_std"][name]["mean"], 4),
                "metric": name,
                "split": summary["evaluated_on"],
                "runs": summary["runs"],
            }
        metrics = read_json(folder / "metrics.json")
        split = "test" if "test" in metrics else "dev"
        if name in metrics.get(split, {}):
            return {
                "name": f"{name} ({split})",
                "value": round(metrics[split][name], 4),
                "metric": name,
                "split": split,
            }
        distill = read_json(folder / "distill.json")
        if distill.get("models", {}).get("student"):
            return {
                "name": f"{distill['metric']} ({distill['split']}, mean of {len(distill['seeds'])})",
                "value": round(distill["models"]["student"]["mean"], 4),
                "metric": distill["metric"],
                "split": distill["split"],
                "runs": len(distill["seeds"]),
            }
    if job.command == "pretrain":
        results = read_json(folder / "results.json")
        for split in ("valid", "test"):
            if "mlm_acc" in results.get(split, {}):
                return {
                    "name": f"mlm_acc ({split})",
                    "value": round(results[split]["mlm_acc"], 4),
                    "metric": "mlm_acc",
                    "split": split,
                }
    if job.command == "sweep":  # the best cell's mean
        results = read_json(folder / "results.json")
        primary = results.get("primary_metric")
        best = next((c for c in results.get("cells", []) if c.get("best")), None)
        if best and primary in best:
            return {
                "name": f"{primary} best: {best['model']} {best['checkpoint']}",
                "value": round(best[primary]["mean"], 4),
                "metric": primary,
                "split": results.get("task", {}).get("evaluated_on", "test"),
                "best": f"{best['model']} {best['checkpoint']}",
            }
        return None
    if job.command == "export":
        change = read_json(folder / "export" / "export.json").get("data_metrics", {}).get("int8_change_points", {})
        key = next(iter(change), None)
        if key:
            return {"name": f"int8 change of {key} (points)", "value": change[key]}
    if job.command == "prepare":
        stats = read_json(folder / "corpus" / "stats.json")
        if "tokens" in stats:
            return {"name": "tokens", "value": stats["tokens"]}
    return None


def distill_report(folder: Path) -> dict | None:
    """distill.json as the job page's table: each model's metric (mean, std, per seed, texts/s) and the tests."""
    result = read_json(folder / "distill.json")
    if not result.get("models"):
        return None
    speeds = result.get("speed_texts_per_s", {})
    rows = [
        {
            "model": name,
            "mean": v["mean"],
            "std": v["std"],
            "per_seed": v["per_seed"],
            "speed": speeds.get("student" if name == "plain" else name),
        }
        for name, v in result["models"].items()
    ]
    tests = [
        {"against": name, **result[f"student_vs_{name}"]}
        for name in ("plain", "floor")
        if f"student_vs_{name}" in result
    ]
    return {
        "metric": result["metric"],
        "split": result["split"],
        "rows": rows,
        "tests": tests,
        "speedup": result.get("speedup"),
        "best": max(r["mean"] for r in rows),
    }


def _classifier_metrics(run: Path) -> dict:
    metrics = read_json(run / "metrics.json")
    out = {}
    for split in ("dev", "test"):
        for k, v in scalars(metrics.get(split, {})).items():
            out[f"{split} {k}"] = round(float(v), 4)
    return out


def _snapshot_metrics(folder: Path, step: int | None) -> dict:
    if step is None:  # final: results.json holds the full validation and test evaluation
        results = read_json(folder / "results.json")
        return {
            f"{split} {k}": round(float(v), 4)
            for split in ("valid", "test")
            for k, v in results.get(split, {}).items()
            if k in ("loss", "mlm_acc", "sop_acc")
        }
    rows = [r for r in read_log(folder / "log.jsonl", "valid") if r["step"] <= step]
    return {f"valid {k}": v for k, v in rows[-1].items() if k in ("loss", "mlm_acc", "sop_acc")} if rows else {}


def register_outputs(session, job: Job, home: Path) -> list[Model]:
    """Record every model (and, for `prepare`, the corpus) a job left in its folder; known paths are skipped."""
    folder = home / job.folder
    known = {m.path for m in session.query(Model).filter(Model.job_id == job.id)}
    found: list[tuple[Path, str, int | None, dict]] = []
    if job.command == "pretrain":
        for snap in sorted(folder.glob("step-*")):
            if (snap / "config.json").is_file() and snap.name[5:].isdigit():
                step = int(snap.name[5:])
                found.append((snap, "snapshot", step, _snapshot_metrics(folder, step)))
        if (folder / "final" / "config.json").is_file():
            step = read_json(folder / "results.json").get("step")
            found.append((folder / "final", "final", step, _snapshot_metrics(folder, None)))
    elif job.command in ("finetune", "sweep", "distill"):  # a distilled student is a classifier folder like finetune's
        runs = [folder] + sorted(folder.glob("seed-*")) + sorted(folder.glob("fold-*"))
        if job.command == "sweep":  # every cell's classifier: cells/MODEL/CHECKPOINT/seed-N
            runs = sorted(folder.glob("cells/*/*/seed-*"))
        for run in runs:
            if (run / "model" / "config.json").is_file():
                found.append(
                    (
                        run / "model",
                        "classifier",
                        read_json(run / "metrics.json").get("best_step"),
                        _classifier_metrics(run),
                    )
                )
            elif (run / LINEAR_FILES[0]).is_file():  # `--method linear`: the run folder is the model
                found.append((run, "linear", None, _classifier_metrics(run)))
    elif job.command == "export" and (folder / "export" / "export.json").is_file():
        info = read_json(folder / "export" / "export.json")
        data = info.get("data_metrics", {})
        metrics = {f"{precision} {k}": v for precision in ("fp32", "int8") for k, v in data.get(precision, {}).items()}
        metrics.update({f"int8 change {k} (points)": v for k, v in data.get("int8_change_points", {}).items()})
        found.append((folder / "export", "export", None, metrics))
    added = []
    for path, kind, step, metrics in found:
        rel = str(path.relative_to(home))
        if rel in known:
            continue
        suffix = (
            ""
            if path in (folder / "model", folder, folder / "export")
            else f" {path.parent.name if kind == 'classifier' else path.name}"
        )
        if job.command == "sweep":
            suffix = " " + " ".join(path.relative_to(folder / "cells").parts[:-1])
        size = sum(folder_size(path / f) for f in LINEAR_FILES) if kind == "linear" else folder_size(path)
        model = Model(
            name=f"{job.name}{suffix}", kind=kind, path=rel, job_id=job.id, step=step, metrics=metrics, size_bytes=size
        )
        session.add(model)
        added.append(model)
    corpus = folder / "corpus"
    if job.command == "prepare" and (corpus / "meta.json").is_file():
        rel = str(corpus.relative_to(home))
        if not session.query(Dataset).filter(Dataset.path == rel).first():
            stats = read_json(corpus / "stats.json")
            session.add(
                Dataset(
                    name=job.name,
                    path=rel,
                    kind="corpus",
                    size_bytes=folder_size(corpus),
                    rows=int(stats.get("documents", 0)),
                    columns={"stats": stats},
                    job_id=job.id,
                )
            )
    return added


def run_config(run: Path) -> dict:
    """The config.yaml a fine-tuning run wrote (one run, or seed-N inside a run with several seeds)."""
    import yaml

    for folder in (run, run.parent):
        if (folder / "config.yaml").is_file():
            try:
                return yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError):
                return {}
    return {}


def _started_from(session, home: Path | None, model: Model, job: Job) -> tuple[Model | None, str]:
    """What a job without a recorded base model started from: one of my models found by its folder (a sweep cell's
    snapshot or base), else the name or path it was given."""
    value = job.config.get("model") or ""
    if job.command == "sweep" and home is not None:  # each cell names its own base: cells/MODEL/CHECKPOINT/seed-N
        run = home / model.path
        value = run_config(run if model.kind == "linear" else run.parent).get("model") or ""
    if not value:
        return None, ""
    if session is not None and home is not None:
        try:
            rel = str(Path(value).resolve().relative_to(home.resolve()))
        except ValueError:
            rel = None
        if rel is not None:
            found = session.query(Model).filter(Model.path == rel).first()
            if found is not None:
                return found, ""
            return None, rel
    return None, str(value)


def lineage(model: Model, session=None, home: Path | None = None) -> list[dict]:
    """base -> job -> model -> job -> model ..., oldest first (with a session and the home folder, a sweep cell's
    chain goes on through the snapshot and the pretraining job it came from)."""
    chain: list[dict] = []
    seen = set()
    current: Model | None = model
    while current is not None and current.id not in seen:
        seen.add(current.id)
        chain.append({"type": "model", "id": current.id, "name": current.name, "kind": current.kind})
        job = current.job
        if job is None:
            break
        chain.append({"type": "job", "id": job.id, "name": job.name, "command": job.command})
        if job.base_model is None:
            found, name = _started_from(session, home, current, job)
            if found is None:
                if name:
                    chain.append({"type": "base", "name": name})
                break
            current = found
            continue
        current = job.base_model
    return list(reversed(chain))
