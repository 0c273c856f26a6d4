"""`domainlm sweep SWEEP.yaml`: every (model, checkpoint, seed) fine-tuned and evaluated the same way, then one
table with mean +- std over seeds, the best cell marked, and a paired bootstrap test of each checkpoint
against its base model.

    out: runs/sweep
    models:
      - name: micro
        base: path/or/name/of/released/model
        snapshots: runs/pt-micro          # every step-* folder of a pretrain run (or a list of folders)
        steps: [320, 960]                 # optional: only these
    finetune: {train: train.jsonl, test: test.jsonl, epochs: 3, learning_rate: 3.0e-5}
    seeds: [1, 2, 3]
    metrics: [accuracy, tolerant_accuracy@2]

Cells run one after another and are resumable: a finished cell (marked DONE) is not rerun while its options are
unchanged; a crashed one, or one whose options changed, is.
A failing cell is reported in the table and in failures.json; the others go on.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from domainlm import config as cfglib
from domainlm.config import option
from domainlm.errors import DomainLMError
from domainlm.sweep.report import html_page, markdown_table, plot_curves
from domainlm.sweep.stats import compare as paired_bootstrap, mean_std
from domainlm.train.logging import read_log


@dataclass(kw_only=True)
class SweepConfig:
    out: str = option(help="output folder: cells/, table.md/.csv, report.html, plots")
    models: list[dict] = option(help="base models with their pretraining snapshots (see `domainlm sweep --help`)")
    finetune: dict = option(help="fine-tuning options shared by every cell (as for `domainlm finetune`)")
    seeds: list[int] = option([1, 2], "seeds per cell")
    metrics: list[str] = option(["accuracy"], "metrics to tabulate; the first one ranks the cells")

    def check(self) -> None:
        from domainlm.classify.config import FinetuneConfig

        known = {f for f in FinetuneConfig.__dataclass_fields__}
        for key in self.finetune:
            if key not in known or key in ("model", "out", "seeds", "folds"):
                raise DomainLMError(f"finetune: option {key!r} is unknown or set by the sweep itself")
        if "train" not in self.finetune:
            raise DomainLMError("finetune: `train` (the labelled training file) is required")
        for i, m in enumerate(self.models):
            if not isinstance(m, dict) or "name" not in m or "base" not in m:
                raise DomainLMError(f"models[{i}]: needs `name` and `base` (and optionally `snapshots`, `steps`)")


@dataclass
class Cell:
    model: str
    checkpoint: str  # "base" or "step N"
    step: int  # 0 for the base model
    path: str
    seed: int

    @property
    def folder(self) -> str:
        return f"{self.model}/{'base' if self.step == 0 else f'step-{self.step:06d}'}/seed-{self.seed}"


def _snapshots(spec: dict) -> list[tuple[int, str]]:
    found = spec.get("snapshots")
    if not found:
        return []
    folders = [Path(p) for p in found] if isinstance(found, list) else sorted(Path(found).glob("step-*"))
    if isinstance(found, str) and not folders:
        raise DomainLMError(f"models: {spec['name']}: no step-* snapshots in {found}")
    out = []
    for f in folders:
        match = re.search(r"(\d+)$", f.name)
        if not f.is_dir() or not match:
            raise DomainLMError(f"models: {spec['name']}: {f} is not a step-N snapshot folder")
        out.append((int(match.group(1)), str(f)))
    wanted = set(spec.get("steps") or [])
    return sorted((s, p) for s, p in out if not wanted or s in wanted)


def plan(cfg: SweepConfig) -> list[Cell]:
    cells = []
    for spec in cfg.models:
        for step, path in [(0, spec["base"])] + _snapshots(spec):
            for seed in cfg.seeds:
                cells.append(Cell(spec["name"], "base" if step == 0 else f"step {step}", step, str(path), seed))
    return cells


def run_cell(cfg: SweepConfig, cell: Cell, root: Path) -> dict:
    from domainlm.classify.command import finetune
    from domainlm.classify.config import FinetuneConfig

    folder = root / "cells" / cell.folder
    try:
        ft = cfglib.load(FinetuneConfig, None, {**cfg.finetune, "model": cell.path, "out": str(folder), "seeds": [cell.seed]})
    except DomainLMError as e:
        raise DomainLMError(f"finetune: {e}") from None
    if (folder / "DONE").is_file():
        # finished with the same options: reuse; with other options (the sweep file changed): run again
        if yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) == cfglib.to_dict(ft):
            return {"status": "done", "skipped": True}
        print(f"cell {cell.folder}: options changed since it ran; running it again", file=sys.stderr)
    if folder.exists():  # a crashed, failed or outdated earlier attempt
        shutil.rmtree(folder)
    try:
        finetune(ft)
    except Exception as e:  # one failed cell must not stop the sweep
        folder.mkdir(parents=True, exist_ok=True)
        message = f"{type(e).__name__}: {e}"
        (folder / "FAILED").write_text(message + "\n\n" + traceback.format_exc(), encoding="utf-8")
        print(f"cell {cell.folder} failed: {message}", file=sys.stderr)
        return {"status": "failed", "error": message}
    (folder / "DONE").write_text("", encoding="utf-8")
    return {"status": "done", "skipped": False}


def _cell_results(root: Path, cell: Cell) -> tuple[dict, np.ndarray] | None:
    folder = root / "cells" / cell.folder
    if not (folder / "DONE").is_file():
        return None
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    split = "test" if "test" in metrics else "dev"
    rows = [json.loads(x) for x in (folder / f"{split}_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    correct = np.asarray([sorted(r["predicted"]) == sorted(r["gold"]) for r in rows], dtype=float)
    return metrics[split], correct


def sweep(cfg: SweepConfig) -> dict:
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    cfglib.write(cfg, root)
    cells = plan(cfg)
    for i, cell in enumerate(cells, 1):
        print(f"[{i}/{len(cells)}] {cell.model} {cell.checkpoint} seed {cell.seed}", file=sys.stderr)
        run_cell(cfg, cell, root)
    return summarize(cfg, cells, root)


def summarize(cfg: SweepConfig, cells: list[Cell], root: Path) -> dict:
    """Aggregate the cells into table.md / table.csv / results.json / report.html and plots."""
    primary = cfg.metrics[0]
    groups: dict[tuple[str, int], dict] = {}
    for cell in cells:
        g = groups.setdefault((cell.model, cell.step), {"checkpoint": cell.checkpoint, "metrics": [], "correct": [], "failed": []})
        result = _cell_results(root, cell)
        if result is None:
            g["failed"].append(cell.seed)
            continue
        metrics, correct = result
        missing = [m for m in cfg.metrics if m not in metrics]
        if missing:
            raise DomainLMError(f"metrics {missing} are not computed (available: {', '.join(k for k, v in metrics.items() if isinstance(v, float))})")
        g["metrics"].append(metrics)
        g["correct"].append(correct)
    results = []
    for (model, step), g in groups.items():
        row = {"model": model, "step": step, "checkpoint": g["checkpoint"], "seeds_done": len(g["metrics"]), "failed_seeds": g["failed"]}
        for m in cfg.metrics:
            if g["metrics"]:
                row[m] = dict(zip(("mean", "std"), mean_std([x[m] for x in g["metrics"]])))
        base = groups.get((model, 0))
        if step and g["correct"] and base and base["correct"] and len(g["correct"][0]) == len(base["correct"][0]):
            row["vs_base"] = paired_bootstrap(np.mean(g["correct"], axis=0), np.mean(base["correct"], axis=0))
        results.append(row)
    done = [r for r in results if primary in r]
    best = max(done, key=lambda r: r[primary]["mean"]) if done else None
    if best:
        best["best"] = True
    (root / "results.json").write_text(json.dumps({"primary_metric": primary, "cells": results}, indent=2, ensure_ascii=False), encoding="utf-8")
    header, rows, csv_rows = _table(cfg, results)
    failures = [{"cell": c.folder, "error": (root / "cells" / c.folder / "FAILED").read_text(encoding="utf-8").split("\n")[0]}
                for c in cells if (root / "cells" / c.folder / "FAILED").is_file()]
    (root / "failures.json").write_text(json.dumps(failures, indent=2, ensure_ascii=False), encoding="utf-8")
    note = (f"Cells: mean ± std over seeds {cfg.seeds} of {', '.join(cfg.metrics)}. ★ best {primary}. "
            "p: paired bootstrap over test rows (correctness averaged over seeds), one-sided, checkpoint vs base; "
            "* p < 0.05.")
    md = ["# Sweep", "", note, "", markdown_table(header, rows), ""]
    if failures:
        md += ["Failed cells:", ""] + [f"- {f['cell']}: {f['error']}" for f in failures] + [""]
    plots = _plots(cfg, results, root)
    md += [f"![{p.stem}]({p.name})" for p in plots]
    (root / "table.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    with open(root / "table.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(csv_rows)
    blocks = [("p", note), ("table", (header, rows))] + [("p", f"failed: {f['cell']}: {f['error']}") for f in failures]
    (root / "report.html").write_text(html_page("Sweep", blocks + [("img", p) for p in plots]), encoding="utf-8")
    print("\n".join(md[:5]))
    print(f"report: {root / 'report.html'}")
    return {"cells": results, "failures": failures, "best": best}


def _table(cfg: SweepConfig, results: list[dict]) -> tuple[list[str], list[list[str]], list[list]]:
    models = list(dict.fromkeys(r["model"] for r in results))
    steps = sorted({r["step"] for r in results})
    header = ["model"] + ["base" if s == 0 else f"step {s}" for s in steps]
    rows, csv_rows = [], [["model", "checkpoint", "step", *[f"{m}_{k}" for m in cfg.metrics for k in ("mean", "std")], "p_vs_base", "failed_seeds"]]
    for model in models:
        row = [model]
        for s in steps:
            r = next((x for x in results if x["model"] == model and x["step"] == s), None)
            if r is None:
                row.append("")
                continue
            if cfg.metrics[0] not in r:
                row.append("failed")
            else:
                text = " / ".join(f"{100 * r[m]['mean']:.1f} ± {100 * r[m]['std']:.1f}" for m in cfg.metrics)
                if "vs_base" in r:
                    p = r["vs_base"]["p_value"]
                    text += f" (p={p:.2f}{'*' if p < 0.05 else ''})"
                if r.get("best"):
                    text = "★ " + text
                if r["failed_seeds"]:
                    text += f" [seeds failed: {r['failed_seeds']}]"
                row.append(text)
            csv_rows.append([model, r["checkpoint"], s, *[r.get(m, {}).get(k, "") for m in cfg.metrics for k in ("mean", "std")],
                             r.get("vs_base", {}).get("p_value", ""), " ".join(map(str, r["failed_seeds"]))])
        rows.append(row)
    return header, rows, csv_rows


def _plots(cfg: SweepConfig, results: list[dict], root: Path) -> list[Path]:
    primary = cfg.metrics[0]
    series, errors = {}, {}
    for model in dict.fromkeys(r["model"] for r in results):
        points = sorted((r["step"], r[primary]["mean"], r[primary]["std"]) for r in results if r["model"] == model and primary in r)
        series[model] = [(s, m) for s, m, _ in points]
        errors[model] = [e for _, _, e in points]
    plots = [plot_curves(series, root / "metric_vs_step.png", f"{primary} vs pretraining step (step 0: base)", primary, errors)]
    losses = {}
    for spec in cfg.models:
        snaps = spec.get("snapshots")
        if isinstance(snaps, str):
            rows = read_log(Path(snaps) / "log.jsonl", "train")
            losses[spec["name"]] = [(r["step"], r.get("mlm_loss", r["loss"])) for r in rows]
    if any(losses.values()):
        plots.append(plot_curves(losses, root / "pretraining_loss.png", "pretraining MLM loss", "mlm_loss"))
    return plots
