"""`domainlm sweep SWEEP.yaml`: every (model, checkpoint, seed) fine-tuned and evaluated the same way, then one
table with mean +- std over seeds, the classical floor, and a test of each checkpoint against its base model.

    out: runs/sweep
    models:
      - name: micro
        base: path/or/name/of/released/model
        snapshots: runs/pt-micro          # every step-* folder of a pretrain run (or a list of folders)
        steps: [320, 960]                 # optional: only these (each must exist)
        pretrain: {corpus: corpus/, max_steps: 960, save_steps: 320}   # optional: run first when snapshots are missing
    finetune: {train: train.jsonl, test: test.jsonl, epochs: 3, learning_rate: 3.0e-5}
    seeds: [1, 2, 3]
    metrics: [accuracy, tolerant_accuracy@2]
    groups: false                         # per-group columns (needs finetune.group_column)
    parallel: 1                           # cells at once, one per GPU (used when more than one GPU is present)

Every option and file is checked before any work starts. A `pretrain:` section (options of `domainlm pretrain`;
`model` defaults to `base`, `out` to `snapshots` or OUT/pretrain/NAME) runs, or resumes, the pretraining when its
snapshots are not all there. Cells are resumable: a finished cell (marked DONE) is not rerun while its options are
unchanged; a crashed one, or one whose options changed, is. A failing cell is reported in the table and in
failures.json, the others go on, and the sweep then exits with status 2.

Validation for early stopping: a fifth of the training rows (no cap) unless finetune.dev is given; a smaller share
is refused, because with a small dev set the epoch each cell keeps follows the noise, and so does the table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

import yaml

from domainlm import config as cfglib
from domainlm import outputs
from domainlm.errors import DomainLMError
from domainlm.files import atomic_write
from domainlm.sweep.config import MIN_VALID_RATIO, ModelSpec, SweepConfig, cell_config, pretrain_config

# what `domainlm sweep` writes into its --out (a file of the user's under one of these names is refused)
SWEEP_OUTPUTS = (
    "config.yaml",
    "cells",
    "pretrain",
    "floor",
    "table.md",
    "table.csv",
    "results.json",
    "report.md",
    "report.html",
    "failures.json",
    "summary.json",
    "*.png",
)


@dataclass
class Cell:
    model: str
    checkpoint: str  # "base" or "step N"
    step: int  # 0 for the base model
    path: str
    seed: int

    @property
    def folder(self) -> str:
        from domainlm.classify.results import seed_folder

        return f"{self.model}/{'base' if self.step == 0 else f'step-{self.step:06d}'}/{seed_folder(self.seed)}"


# ---- planning: what exists, what pretraining must run, which cells --------------------------------------------


def _expected_steps(pt) -> list[int]:
    return list(range(pt.save_steps, pt.max_steps + 1, pt.save_steps))


def _is_snapshot(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def pretraining_needed(pt) -> bool:
    return not all(_is_snapshot(Path(pt.out) / f"step-{s:06d}") for s in _expected_steps(pt))


def _snapshots(cfg: SweepConfig, spec: ModelSpec) -> list[tuple[int, str]]:
    """(step, folder) of the snapshots to fine-tune; with a pretrain section, the ones it will write."""
    name, found, pt = spec.name, spec.snapshots, pretrain_config(cfg, spec)
    if pt is not None:
        out = [(s, str(Path(pt.out) / f"step-{s:06d}")) for s in _expected_steps(pt)]
    elif not found:
        out = []
    else:
        if isinstance(found, str):
            if not Path(found).is_dir():
                raise DomainLMError(
                    f"models: {name}: snapshots folder {found} does not exist (add a pretrain section to make it)"
                )
            folders = sorted(Path(found).glob("step-*"))
            if not folders:
                raise DomainLMError(f"models: {name}: no step-* snapshots in {found}")
        else:
            folders = [Path(p) for p in found]
        out = []
        for f in folders:
            match = re.search(r"(\d+)$", f.name)
            if not f.is_dir() or not match:
                raise DomainLMError(f"models: {name}: {f} is not a step-N snapshot folder")
            out.append((int(match.group(1)), str(f)))
    wanted = spec.steps
    if wanted:
        missing = sorted(set(wanted) - {s for s, _ in out})
        if missing:
            raise DomainLMError(
                f"models: {name}: steps {missing} have no snapshot (available: {sorted(s for s, _ in out) or 'none'})"
            )
        out = [(s, p) for s, p in out if s in set(wanted)]
    return sorted(out)


def _check_base(name: str, base: str) -> None:
    from domainlm.interop.resolve import looks_local

    local = looks_local(base)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not Path(base).exists() and (local or offline):
        raise DomainLMError(
            f"models: {name}: base {base}: no such folder" + ("" if local else " (and HF_HUB_OFFLINE is set)")
        )


def check_models(cfg: SweepConfig) -> None:
    """Each model as its commands check it, before any cell runs: the base as finetune checks a model (positions
    against the cells' length, weights, tokenizer), a pretrain section as pretrain checks its options (corpus,
    tokenizer, vocabulary; the corpus's ids are read by the run itself). A hub name not downloaded is left to the
    run."""
    from domainlm.classify.checks import check as finetune_check
    from domainlm.pretrain.checks import check as pretrain_check

    for spec in cfg.models:
        _, errors = finetune_check(cell_config(cfg, spec.base, "out", cfg.seeds[0]), read_task=False, network=False)
        pt = pretrain_config(cfg, spec)
        if pt is not None:
            errors = {**errors, **pretrain_check(pt, network=False, scan_ids=False)[1]}
        if errors:
            raise DomainLMError(f"models: {spec.name}: {next(iter(errors.values()))}")


def plan(cfg: SweepConfig) -> list[Cell]:
    cells = []
    for spec in cfg.models:
        _check_base(spec.name, spec.base)
        for step, path in [(0, spec.base)] + _snapshots(cfg, spec):
            for seed in cfg.seeds:
                cells.append(Cell(spec.name, "base" if step == 0 else f"step {step}", step, str(path), seed))
    return cells


def check_data(cfg: SweepConfig):
    """Read every data file once, with finetune's own reader (columns, labels, validation share), so that a bad file
    fails before any cell runs. Returns what the report tells about the task, and the task read (for the floor)."""
    from domainlm.classify.data import read_task

    ft = cell_config(cfg, "model", "out", cfg.seeds[0])
    try:
        task = read_task(ft)
    except DomainLMError as e:
        raise DomainLMError(f"finetune: {e}") from None
    train = task.train
    if not ft.dev and ft.valid_max_rows and ft.valid_max_rows < MIN_VALID_RATIO * len(train):
        raise DomainLMError(
            f"finetune: valid_max_rows {ft.valid_max_rows} is under {MIN_VALID_RATIO:.0%} of the {len(train)} "
            "training rows; raise it (0: no cap) or give a `dev` file"
        )
    n_valid = task.n_valid(ft)
    test = task.test
    return {
        "task": ft.task,
        "labels": task.labels,
        "train": ft.train,
        "train_rows": len(train),
        "dev": ft.dev,
        "valid_rows": n_valid,
        "fit_rows": len(train) - (0 if task.dev else n_valid),
        "test": ft.test,
        "test_rows": len(test) if test else 0,
        "evaluated_on": "test" if test else "dev",
        "metric": cfg.metrics[0],
        "seeds": cfg.seeds,
        "selection_metric": ft.best_metric,
    }, task


# ---- running ------------------------------------------------------------------------------------------------


def device_plan(parallel: int, gpus: int) -> list[str | None]:
    """One slot per concurrent cell: a GPU index for each of min(parallel, gpus) workers when more than one GPU is
    present; else a single in-process slot (None), and cells run one after another."""
    if parallel > 1 and gpus > 1:
        return [str(i) for i in range(min(parallel, gpus))]
    return [None]


def remove_inside(path: Path, root: Path) -> None:
    """Delete a cell's old folder, never anything outside the sweep's cells/ folder."""
    fence = root / "cells"
    if not outputs.inside(path, fence, strict=True):
        raise DomainLMError(f"refusing to delete {path}: it is not inside {fence.resolve()}")
    outputs.remove_tree(path, fence)


def _as_written(ft) -> dict:
    """A cell's options as its finetune writes them into config.yaml: precision resolved (auto -> what runs)."""
    from domainlm.precision import resolve

    return {**cfglib.to_dict(ft), "precision": resolve(ft.precision, "cuda" if _gpu_count() else "cpu")[0]}


def run_cell(cfg: SweepConfig, cell: Cell, root: Path, device: str | None = None) -> dict:
    from domainlm.classify.command import finetune

    folder = root / "cells" / cell.folder
    ft = cell_config(cfg, cell.path, str(folder), cell.seed)
    if (folder / "DONE").is_file():
        # finished with the same options: reuse; with other options (the sweep file changed): run again
        if yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) == _as_written(ft):
            return {"status": "done", "skipped": True}
        print(f"cell {cell.folder}: options changed since it ran; running it again", file=sys.stderr)
    if folder.exists():  # a crashed, failed or outdated earlier attempt
        remove_inside(folder, root)
    try:
        if device is None:
            finetune(ft)
        else:  # its own process, seeing one GPU
            folder.mkdir(parents=True)
            spec = cfglib.write(ft, folder, "cell.yaml")
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
            with open(folder / "cell.log", "w", encoding="utf-8") as log:
                done = subprocess.run(
                    [sys.executable, "-m", "domainlm.cli", "finetune", "--config", str(spec)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    check=False,
                )
            if done.returncode:
                tail = (folder / "cell.log").read_text(encoding="utf-8").strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"exit status {done.returncode}: {tail[0]}")
    except Exception as e:  # one failed cell must not stop the sweep
        message = f"{type(e).__name__}: {e}" if not isinstance(e, DomainLMError) else str(e)
        atomic_write(folder / "FAILED", message + "\n\n" + traceback.format_exc())
        print(f"cell {cell.folder} failed: {message}", file=sys.stderr)
        return {"status": "failed", "error": message}
    atomic_write(folder / "DONE", "")
    return {"status": "done", "skipped": False}


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_cells(cfg: SweepConfig, cells: list[Cell], root: Path, slots: list[str | None]) -> None:
    if slots == [None]:
        for i, cell in enumerate(cells, 1):
            print(f"[{i}/{len(cells)}] {cell.model} {cell.checkpoint} seed {cell.seed}", file=sys.stderr)
            run_cell(cfg, cell, root)
        return
    free: Queue = Queue()
    for slot in slots:
        free.put(slot)

    def task(cell: Cell) -> None:
        device = free.get()
        try:
            print(f"{cell.model} {cell.checkpoint} seed {cell.seed} on GPU {device}", file=sys.stderr)
            run_cell(cfg, cell, root, device)
        finally:
            free.put(device)

    with ThreadPoolExecutor(len(slots)) as pool:
        list(pool.map(task, cells))


def run_pretraining(cfg: SweepConfig) -> None:
    from domainlm.pretrain.command import pretrain

    for spec in cfg.models:
        pt = pretrain_config(cfg, spec)
        if pt is not None and pretraining_needed(pt):
            print(f"pretraining {spec.name} into {pt.out} (resumes from its newest checkpoint if any)", file=sys.stderr)
            pretrain(pt)
            if pretraining_needed(pt):
                raise DomainLMError(f"models: {spec.name}: pretraining ended without all of its snapshots in {pt.out}")


def sweep(cfg: SweepConfig) -> dict:
    """check everything, then pretraining where its snapshots are missing, the floor, the cells, the summary; a
    rerun continues: finished cells (and the floor) with unchanged options are reused."""
    from domainlm.sweep.summary import fit_floor, summarize

    cfglib.validate(cfg)  # again: a config built in code has not been through load()
    with outputs.run_folder(
        cfg.out, "sweep", patterns=SWEEP_OUTPUTS, resume=True, legacy=outputs.config_with("models")
    ) as out:
        task, data = check_data(cfg)  # every check before any work: files, options, names, steps, pretraining sections
        cells = plan(cfg)
        check_models(cfg)
        slots = device_plan(cfg.parallel, _gpu_count() if cfg.parallel > 1 else 0)
        if cfg.parallel > 1 and slots == [None]:
            print("fewer than 2 GPUs: cells run one after another", file=sys.stderr)
        out.begin(cfg)
        out.record("pretrain"), out.record("cells")
        run_pretraining(cfg)
        floor = fit_floor(cfg, out, data) if cfg.floor else None
        run_cells(cfg, cells, out.root(), slots)
        result = summarize(cfg, cells, out, task, floor)
    if result["failures"]:
        raise DomainLMError(
            f"{len(result['failures'])} of {len(cells)} cells failed (see {Path(cfg.out) / 'failures.json'}); "
            "the table shows the others"
        )
    return result
