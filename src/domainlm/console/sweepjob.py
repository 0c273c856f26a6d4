"""The sweep job: base models x pretraining snapshots x seeds, as `domainlm sweep` runs them.

The form (SweepJobConfig) names what the console knows: base models (listed ones or my models) and pretraining
jobs (their step-N snapshots, each next to the base model it started from). It becomes the SweepConfig that
`domainlm sweep job.yaml` reads, checked by the sweep's own checks when the job is created. The job page shows
what the sweep wrote: the "what to ship" sentence, the table with Holm-adjusted tests, and the plot.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from domainlm import config as cfglib
from domainlm.classify.config import FinetuneConfig
from domainlm.config import option, reuse
from domainlm.console import preflight
from domainlm.console.catalog import read_json
from domainlm.console.db import Job
from domainlm.errors import DomainLMError
from domainlm.options import PrecisionOption

# fine-tuning options every cell shares, as the form shows them (the rest keep the CLI's defaults)
FINETUNE_FIELDS = (
    "train",
    "dev",
    "test",
    "task",
    "text_column",
    "label_column",
    "method",
    "lora_rank",
    "epochs",
    "batch_size",
    "learning_rate",
    "max_seq_len",
    "valid_ratio",
    "precision",
    "logging_freq",
)


def _ft(name: str, default=None, help: str | None = None):
    """A fine-tuning option of the form: finetune's own field (flag, range, help), with the form's default."""
    from domainlm.classify.config import FinetuneConfig

    field = FinetuneConfig.__dataclass_fields__[name]
    return reuse(FinetuneConfig, name, field.default if default is None else default, help)


@dataclass(kw_only=True)
class SweepJobConfig(PrecisionOption):
    base_models: list[str] = option([], "base models to compare (each is also the step-0 row of its snapshots)")
    pretrain_jobs: list[int] = option([], "pretraining jobs: their step-N snapshots, each beside its base model")
    seeds: list[int] = option([1, 2, 3], "seeds per cell (3 or more make the test against the base meaningful)")
    metrics: list[str] = option(["accuracy"], "metrics to tabulate; the first one ranks the cells")
    floor: bool = option(True, "fit the classical floor (char n-gram TF-IDF + linear model) once and show it")
    train: str = reuse(FinetuneConfig, "train", dataclasses.MISSING)
    test: str | None = _ft("test", help="test file every cell is scored on (or a dev file)")
    dev: str | None = _ft("dev", help="validation file (default: a fifth of the training rows)")
    task: Literal["multiclass", "multilabel"] = _ft("task")
    text_column: str = _ft("text_column")
    label_column: str = _ft("label_column")
    method: Literal["full", "lora"] = option("full", "train all weights, or LoRA adapters")
    lora_rank: int = _ft("lora_rank")
    epochs: int = _ft("epochs")
    batch_size: int = _ft("batch_size")
    learning_rate: float = _ft("learning_rate")
    max_seq_len: int = _ft("max_seq_len")
    valid_ratio: float = option(
        0.2, "share of the training rows held out for validation when no dev file", low=0.2, high=0.5
    )
    logging_freq: int = _ft("logging_freq")
    out: str = option(help="output folder (set by the console)")


def _name(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "-", text).strip("-.")[:60] or "model"


def to_sweep(factory, s, cfg: SweepJobConfig, errors: dict):
    """The SweepConfig of a form; problems go into `errors` under the form's field names."""
    from domainlm.sweep.config import SweepConfig

    models, names, bases = [], set(), set()

    def unique(text: str) -> str:
        name, i = _name(text), 2
        while name in names:
            name, i = f"{_name(text)}-{i}", i + 1
        names.add(name)
        return name

    for job_id in cfg.pretrain_jobs:
        job = s.get(Job, job_id)
        if job is None or job.command != "pretrain":
            errors["pretrain_jobs"] = f"job {job_id} is not a pretraining job"
            continue
        if not any((factory.home / job.folder).glob("step-*")):
            errors["pretrain_jobs"] = (
                f"pretraining job {job_id} ({job.name}) has no step-N snapshots (save steps 0, or not finished)"
            )
            continue
        base = str(job.config.get("model", ""))
        bases.add(base)
        models.append({"name": unique(job.name), "base": base, "snapshots": str(factory.home / job.folder)})
    for value in cfg.base_models:
        path, found = factory._model(s, value, errors, "base_models")
        if path is not None and path not in bases:
            bases.add(path)
            models.append({"name": unique(found.name if found else Path(path).name), "base": path})
    if not models and "base_models" not in errors and "pretrain_jobs" not in errors:
        errors["base_models"] = "choose at least one base model or pretraining job"
    finetune = {k: getattr(cfg, k) for k in FINETUNE_FIELDS if getattr(cfg, k) is not None}
    if cfg.method != "lora":
        finetune.pop("lora_rank")
    values = {
        "out": cfg.out,
        "models": models,
        "finetune": finetune,
        "seeds": cfg.seeds,
        "metrics": cfg.metrics,
        "floor": cfg.floor,
    }
    # the sweep's check() stops at its first problem: note it, set that field to a valid stand-in, check again, so
    # that one answer lists every problem (and the checks after these still run)
    stand_in = {"seeds": ("seeds", [1]), "metrics": ("metrics", ["accuracy"])}
    for _ in range(len(stand_in) + 1):
        sweep, problems = cfglib.check_values(SweepConfig, values)
        if sweep is not None:
            return sweep
        key, message = next(iter(problems.items()))
        field = _field(message, key)
        errors.setdefault(field, message)
        if field not in stand_in:
            return None
        values[stand_in[field][0]] = stand_in[field][1]
    return None


def _field(message: str, key: str) -> str:
    """The form field a sweep message is about (`finetune: --max-seq-len ...` -> max_seq_len)."""
    flag = re.search(r"--([a-z][a-z0-9-]*)", message)
    if flag and flag.group(1).replace("-", "_") in SweepJobConfig.__dataclass_fields__:
        return flag.group(1).replace("-", "_")
    head = message.split(":", 1)[0].strip()
    if head in ("seeds", "metrics"):
        return head
    if head == "models":
        return "base_models"
    if head == "finetune":
        for name in FINETUNE_FIELDS:
            if re.search(rf"\b{name}\b", message):
                return name
        return "train"
    return key if key in SweepJobConfig.__dataclass_fields__ else "base_models"


def check(factory, s, cfg: SweepJobConfig, errors: dict):
    """Every check `domainlm sweep` makes before its first cell, and each model's positions against the length."""
    from domainlm.sweep.command import check_data, plan

    sweep = to_sweep(factory, s, cfg, errors)
    if sweep is None:
        return None
    for step in (check_data, plan):
        try:
            step(sweep)
        except DomainLMError as e:
            errors.setdefault(_field(str(e), "base_models"), str(e).replace(str(factory.home.resolve()) + "/", ""))
    for spec in sweep.models:
        preflight.model_positions(spec.base, cfg.max_seq_len, errors, "base_models")
    return sweep


def report(folder: Path) -> dict | None:
    """The sentence, the table (the sweep's own definition) and the plots of a finished sweep."""
    from domainlm.sweep.config import SweepConfig
    from domainlm.sweep.table import table

    results = read_json(folder / "results.json")
    if not results:
        return None
    cfg = cfglib.load(SweepConfig, str(folder / "job.yaml"))
    header, rows, _ = table(cfg, results["cells"], results.get("floor"), results["task"]["evaluated_on"])
    plots = [p.name for p in (folder / "metric_vs_step.png", folder / "pretraining_loss.png") if p.is_file()]
    failures = read_json(folder / "failures.json") if (folder / "failures.json").is_file() else []
    return {
        "conclusion": results["conclusion"],
        "header": header,
        "rows": rows,
        "plots": plots,
        "failures": failures,
        "markdown": (folder / "table.md").read_text(encoding="utf-8") if (folder / "table.md").is_file() else "",
    }
