"""`domainlm sweep` options (the YAML file; see sweep/command.py) and the options of each of its cells: the
`finetune:` section as a FinetuneConfig, a model's `pretrain:` section as a PretrainConfig."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from domainlm import config as cfglib
from domainlm.config import option
from domainlm.errors import DomainLMError

MODEL_KEYS = {"name", "base", "snapshots", "steps", "pretrain"}
SET_BY_SWEEP = ("model", "out", "seeds", "folds", "floor")
MIN_VALID_RATIO = 0.2
_NAME = re.compile(r"[\w.+-]+")


@dataclass(kw_only=True)
class SweepConfig:
    out: str = option(help="output folder: cells/, floor/, table.md/.csv, report.html, plots")
    models: list[dict] = option(help="base models with their pretraining snapshots (see `domainlm sweep --help`)")
    finetune: dict = option(help="fine-tuning options shared by every cell (as for `domainlm finetune`)")
    seeds: list[int] = option([1, 2, 3], "seeds per cell (3 or more make the test against the base meaningful)")
    metrics: list[str] = option(["accuracy"], "metrics to tabulate; the first one ranks the cells")
    floor: bool = option(True, "fit the classical floor (char n-gram TF-IDF + linear model) once and show it")
    groups: bool = option(False, "per-group columns (finetune.group_column names the group)")
    parallel: int = option(1, "cells at once, one per GPU; with fewer than 2 GPUs cells run one after another", low=1)

    def check(self) -> None:
        """Everything that can be checked without reading files."""
        from domainlm.classify.config import FinetuneConfig
        from domainlm.classify.metrics import metric_names

        if not self.seeds:
            raise DomainLMError("seeds: needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise DomainLMError(f"seeds: {self.seeds} repeats a seed")
        if not self.models:
            raise DomainLMError("models: needs at least one model")
        known = set(FinetuneConfig.__dataclass_fields__)
        for key in self.finetune:
            if key not in known:
                raise DomainLMError(f"finetune: unknown option {key!r} (known: {', '.join(sorted(known - set(SET_BY_SWEEP)))})")
            if key in SET_BY_SWEEP:
                raise DomainLMError(f"finetune: option {key!r} is set by the sweep itself")
        if "train" not in self.finetune:
            raise DomainLMError("finetune: `train` (the labelled training file) is required")
        if not (self.finetune.get("test") or self.finetune.get("dev")):
            raise DomainLMError("finetune: give `test` (or `dev`): every cell must be scored on the same rows")
        ft = cell_config(self, "model", "out", self.seeds[0])
        if ft.method == "linear":
            raise DomainLMError("finetune: method 'linear' is the floor, which the sweep fits by itself (floor: true)")
        available = metric_names(ft.multilabel, ft.tolerant_k)
        unknown = [m for m in self.metrics if m not in available]
        if unknown or not self.metrics:
            raise DomainLMError(f"metrics: {unknown or '[]'} not computed for a {ft.task} task; choose from {', '.join(available)}")
        if self.groups and not ft.group_column:
            raise DomainLMError("groups: true needs finetune.group_column (the column holding each row's group)")
        if not ft.dev and ft.valid_ratio < MIN_VALID_RATIO:
            raise DomainLMError(f"finetune: valid_ratio {ft.valid_ratio} holds out too few rows to pick each cell's epoch "
                                f"reliably; use at least {MIN_VALID_RATIO} or give a `dev` file")
        names = set()
        for i, m in enumerate(self.models):
            if not isinstance(m, dict) or "name" not in m or "base" not in m:
                raise DomainLMError(f"models[{i}]: needs `name` and `base` (and optionally {', '.join(sorted(MODEL_KEYS - {'name', 'base'}))})")
            extra = sorted(set(m) - MODEL_KEYS)
            if extra:
                raise DomainLMError(f"models[{i}] ({m['name']}): unknown key(s) {extra} (known: {', '.join(sorted(MODEL_KEYS))})")
            name = str(m["name"])
            if not _NAME.fullmatch(name) or ".." in name or name.startswith("."):
                raise DomainLMError(f"models[{i}]: name {name!r} becomes a folder name: use letters, digits, '_', '-', '+' "
                                    "and '.' only (no path separators, no '..', not starting with '.')")
            if name in names:
                raise DomainLMError(f"models[{i}]: name {name!r} is used twice; their cells would overwrite each other")
            names.add(name)
            steps = m.get("steps")
            if steps is not None and (not isinstance(steps, list) or not steps or
                                      not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in steps)):
                raise DomainLMError(f"models: {name}: steps must be a non-empty list of positive step numbers, got {steps!r}")
            if m.get("pretrain") is not None and not isinstance(m["pretrain"], dict):
                raise DomainLMError(f"models: {name}: pretrain must be a mapping of `domainlm pretrain` options")


def cell_config(cfg: SweepConfig, model: str, out: str, seed: int):
    from domainlm.classify.config import FinetuneConfig

    try:
        return cfglib.load(FinetuneConfig, None, {**cfg.finetune, "model": model, "out": out, "seeds": [seed],
                                                    # a blend mixes each cell with a floor fitted on that cell's rows
                                                    "floor": bool(cfg.finetune.get("blend"))})
    except DomainLMError as e:
        raise DomainLMError(f"finetune: {e}") from None


def pretrain_config(cfg: SweepConfig, spec: dict):
    """The model's `pretrain:` section as a checked PretrainConfig, or None."""
    from domainlm.pretrain.config import PretrainConfig

    section = spec.get("pretrain")
    if section is None:
        return None
    snapshots = spec.get("snapshots")
    if snapshots is not None and not isinstance(snapshots, str):
        raise DomainLMError(f"models: {spec['name']}: with a pretrain section, snapshots must be one folder (its out)")
    defaults = {"model": spec["base"], "out": snapshots or str(Path(cfg.out) / "pretrain" / spec["name"]), "resume": "auto"}
    try:
        pt = cfglib.load(PretrainConfig, None, {**defaults, **section})
    except DomainLMError as e:
        raise DomainLMError(f"models: {spec['name']}: pretrain: {e}") from None
    if not pt.save_steps:
        raise DomainLMError(f"models: {spec['name']}: pretrain: save_steps is needed (the sweep fine-tunes the step-N snapshots)")
    if not Path(pt.corpus).is_dir():
        raise DomainLMError(f"models: {spec['name']}: pretrain: corpus {pt.corpus} is not a folder")
    return pt
