"""`domainlm sweep` options (the YAML file; see sweep/command.py) and the options of each of its cells: the
`finetune:` section as a FinetuneConfig, a model's `pretrain:` section as a PretrainConfig."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainlm import checks
from domainlm import config as cfglib
from domainlm.config import option
from domainlm.errors import DomainLMError

SET_BY_SWEEP = ("model", "out", "seeds", "folds", "floor")
MIN_VALID_RATIO = 0.2
_NAME = re.compile(r"[\w.+-]+")


@dataclass(kw_only=True)
class ModelSpec:
    """One entry of `models:` — a base model and the snapshots of its continued pretraining."""

    name: str = option(help="the model's name in the table (and its folder under cells/)")
    base: str = option(help="the released model: HF name or folder")
    snapshots: Any = option(None, "a `domainlm pretrain` --out (its step-* snapshots) or a list of snapshot folders")
    steps: list[int] | None = option(None, "only these snapshot steps (each must exist)")
    pretrain: dict | None = option(
        None, "`domainlm pretrain` options: run (or resume) the pretraining first when its snapshots are missing"
    )

    def check(self) -> None:
        if not _NAME.fullmatch(self.name) or ".." in self.name or self.name.startswith("."):
            raise DomainLMError(
                f"name {self.name!r} becomes a folder name: use letters, digits, '_', '-', '+' and '.' "
                "only (no path separators, no '..', not starting with '.')"
            )
        if self.steps is not None and (not self.steps or any(s <= 0 for s in self.steps)):
            raise DomainLMError(
                f"{self.name}: steps must be a non-empty list of positive step numbers, got {self.steps!r}"
            )
        shots = self.snapshots
        if (
            shots is not None
            and not isinstance(shots, str)
            and not (isinstance(shots, list) and all(isinstance(p, str) for p in shots))
        ):
            raise DomainLMError(f"{self.name}: snapshots must be a folder or a list of folders, got {shots!r}")


@dataclass(kw_only=True)
class SweepConfig:
    out: str = option(help="output folder: cells/, floor/, table.md/.csv, report.html, plots")
    models: list[ModelSpec] = option(help="base models with their pretraining snapshots (see `domainlm sweep --help`)")
    finetune: dict = option(help="fine-tuning options shared by every cell (as for `domainlm finetune`)")
    seeds: list[int] = option([1, 2, 3], "seeds per cell (3 or more make the test against the base meaningful)")
    metrics: list[str] = option(["accuracy"], "metrics to tabulate; the first one ranks the cells")
    floor: bool = option(True, "fit the classical floor (char n-gram TF-IDF + linear model) once and show it")
    groups: bool = option(False, "per-group columns (finetune.group_column names the group)")
    parallel: int = option(1, "cells at once, one per GPU; with fewer than 2 GPUs cells run one after another", low=1)

    def __post_init__(self) -> None:  # a config built in code may list its models as mappings
        self.models = [
            m if isinstance(m, ModelSpec) else cfglib.load(ModelSpec, None, m, where=f"models[{i}]: ")
            for i, m in enumerate(self.models)
        ]

    def check(self) -> None:
        """Everything that can be checked without reading files."""
        from domainlm.classify.config import FinetuneConfig
        from domainlm.classify.metrics import metric_names

        checks.seeds(self.seeds, "seeds:")
        if not self.models:
            raise DomainLMError("models: needs at least one model")
        known = set(FinetuneConfig.__dataclass_fields__)
        for key in self.finetune:
            if key not in known:
                raise DomainLMError(
                    f"finetune: unknown option {key!r} (known: {', '.join(sorted(known - set(SET_BY_SWEEP)))})"
                )
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
            raise DomainLMError(
                f"metrics: {unknown or '[]'} not computed for a {ft.task} task; choose from {', '.join(available)}"
            )
        if self.groups and not ft.group_column:
            raise DomainLMError("groups: true needs finetune.group_column (the column holding each row's group)")
        if not ft.dev and ft.valid_ratio < MIN_VALID_RATIO:
            raise DomainLMError(
                f"finetune: valid_ratio {ft.valid_ratio} holds out too few rows to pick each cell's epoch "
                f"reliably; use at least {MIN_VALID_RATIO} or give a `dev` file"
            )
        names = set()
        for i, m in enumerate(self.models):
            if m.name in names:
                raise DomainLMError(
                    f"models[{i}]: name {m.name!r} is used twice; their cells would overwrite each other"
                )
            names.add(m.name)


def cell_config(cfg: SweepConfig, model: str, out: str, seed: int):
    from domainlm.classify.config import FinetuneConfig

    try:
        return cfglib.load(
            FinetuneConfig,
            None,
            {
                **cfg.finetune,
                "model": model,
                "out": out,
                "seeds": [seed],
                # a blend mixes each cell with a floor fitted on that cell's rows
                "floor": bool(cfg.finetune.get("blend")),
            },
        )
    except DomainLMError as e:
        raise DomainLMError(f"finetune: {e}") from None


def pretrain_config(cfg: SweepConfig, spec: ModelSpec):
    """The model's `pretrain:` section as a checked PretrainConfig, or None."""
    from domainlm.pretrain.config import PretrainConfig

    if spec.pretrain is None:
        return None
    if spec.snapshots is not None and not isinstance(spec.snapshots, str):
        raise DomainLMError(f"models: {spec.name}: with a pretrain section, snapshots must be one folder (its out)")
    defaults = {
        "model": spec.base,
        "out": spec.snapshots or str(Path(cfg.out) / "pretrain" / spec.name),
        "resume": "auto",
    }
    pt = cfglib.load(PretrainConfig, None, {**defaults, **spec.pretrain}, where=f"models: {spec.name}: pretrain: ")
    if not pt.save_steps:
        raise DomainLMError(
            f"models: {spec.name}: pretrain: save_steps is needed (the sweep fine-tunes the step-N snapshots)"
        )
    from domainlm.pretrain.mixture import paths

    for corpus in paths(pt.corpus):  # one corpus, or several drawn by weight
        if not Path(corpus).is_dir():
            raise DomainLMError(f"models: {spec.name}: pretrain: corpus {corpus} is not a folder")
    return pt
