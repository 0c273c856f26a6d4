"""A finished sweep as something a person can decide from: the conclusion in one sentence, the task, the table (with
the floor, raw and Holm-adjusted p-values), each seed's value beside the mean, and the pretraining curves."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from domainlm.classify.report import read_correctness
from domainlm.errors import DomainLMError
from domainlm.outputs import Writer
from domainlm.stats import compare, holm, mean_std
from domainlm.sweep.report import html_page, markdown_table
from domainlm.sweep.table import pct, plots, pval, table

ALPHA = 0.05


# ---- the floor, once per task -------------------------------------------------------------------------------


def fit_floor(cfg, out: Writer, data: tuple) -> dict:
    """The classical floor on the rows the first seed's cells train on, scored on the cells' evaluation rows, in
    `out`/floor. `data`: the task check_data read. Reused while the fine-tuning options (data, columns, task,
    validation) are unchanged."""
    from domainlm.classify import linear
    from domainlm.classify.report import write_outputs
    from domainlm.classify.results import FLOOR
    from domainlm.sweep.config import cell_config

    ft = cell_config(cfg, "model", "out", cfg.seeds[0])
    floor = out.sub(FLOOR)
    folder = out.root() / FLOOR
    key = {
        "finetune": cfg.finetune,
        "seed": cfg.seeds[0],
        "grid": [list(linear.FEATURES), list(linear.CLASSIFIERS), list(linear.C_GRID)],
    }
    if (
        (folder / "metrics.json").is_file()
        and (folder / "options.json").is_file()
        and json.loads((folder / "options.json").read_text(encoding="utf-8")) == json.loads(json.dumps(key))
    ):
        return json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    fit, dev = data.split(data.train, ft, cfg.seeds[0])
    print("fitting the classical floor (char n-gram TF-IDF + linear model)", flush=True)
    split = "test" if data.test is not None else "dev"
    model, scored = linear.evaluate(
        fit,
        dev,
        {"test": data.test} if data.test is not None else {},
        data.labels,
        ft.multilabel,
        ft.best_metric,
        ft.tolerant_k,
    )
    linear.save(model, floor, ft)
    write_outputs(
        floor,
        split,
        scored.rows[split],
        scored.probs[split],
        data.labels,
        ft.multilabel,
        scored.metrics[split],
        model.thresholds,
    )
    floor.write_json("metrics.json", scored.metrics)
    floor.write_text("options.json", json.dumps(key, ensure_ascii=False))
    return scored.metrics


# ---- gathering and testing --------------------------------------------------------------------------------


def _cell_results(root: Path, folder: str) -> tuple[dict, np.ndarray] | None:
    path = root / "cells" / folder
    if not (path / "DONE").is_file():
        return None
    metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    split = "test" if "test" in metrics else "dev"
    return metrics[split], read_correctness(path / f"{split}_predictions.jsonl")[0]


def _blend_results(root: Path, folder: str) -> tuple[dict, np.ndarray, float, dict, np.ndarray] | None:
    """A cell's blend with its own floor (`finetune --blend`: the floor fitted on that cell's rows), on the test rows
    only (on dev rows it chose its weight): the blend's metrics and per-row correctness, its weight, and the same two
    of the cell's floor."""
    path = root / "cells" / folder
    floor = path / "floor" / "test_predictions.jsonl"
    if not (path / "DONE").is_file() or not (path / "blend_test_predictions.jsonl").is_file() or not floor.is_file():
        return None
    metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    blend = metrics.get("blend", {})
    return (
        blend["test"],
        read_correctness(path / "blend_test_predictions.jsonl")[0],
        blend["weight"],
        metrics["floor"]["test"],
        read_correctness(floor)[0],
    )


def _test_blends(cfg, results: list[dict]) -> None:
    """Each blend against the model alone (same cells) and against the floors it was mixed with (each cell's own,
    paired by seed), by the same two-level test as the checkpoints, Holm-adjusted over the two."""
    primary = cfg.metrics[0]
    for r in results:
        b = r.get("blend")
        if not b or not b["correct"]:
            continue
        for m in cfg.metrics:
            if b["values"][m]:
                b[m] = dict(zip(("mean", "std"), mean_std(b["values"][m])))
            if b["floor_values"][m]:
                b.setdefault("floor", {})[m] = dict(zip(("mean", "std"), mean_std(b["floor_values"][m])))
        tests = {"vs_model": np.stack(r["correct"])} if r["correct"] else {}
        if b["floor_correct"]:
            tests["vs_floor"] = np.stack(b["floor_correct"])
        for (name, base), adjusted in zip(
            tests.items(), holm([compare(np.stack(b["correct"]), x)["p_value"] for x in tests.values()])
        ):
            b[name] = {**compare(np.stack(b["correct"]), base), "p_holm": float(adjusted)}
            b[name]["win"] = bool(adjusted < ALPHA and b[name]["difference"] > 0)
        b["weight"] = float(np.mean(b.pop("weights")))
        del b["correct"], b["floor_correct"]
        if primary not in b:
            del r["blend"]


def blend_verdict(cfg, results: list[dict]) -> str | None:
    """The best blend, said as a decision: ship it only where it beats both the model alone and the floor."""
    primary = cfg.metrics[0]
    blended = [r for r in results if primary in r.get("blend", {})]
    if not blended:
        return None
    r = max(blended, key=lambda r: r["blend"][primary]["mean"])
    b = r["blend"]
    name = f"the blend of {r['model']} {r['checkpoint']} with the floor (model weight {b['weight']:.2f})"
    value = f"{primary} {pct(b[primary]['mean'])} ± {pct(b[primary]['std'])}"
    tests = [
        (what, b[key])
        for what, key in (
            ("the model alone", "vs_model"),
            ("the floors it was mixed with (each cell's own, paired by seed)", "vs_floor"),
        )
        if key in b
    ]
    said = {
        what: f"{what} by {100 * t['difference']:+.1f} points (Holm-adjusted p {pval(t['p_holm'])})"
        for what, t in tests
    }
    wins = [said[what] for what, t in tests if t["win"]]
    losses = [said[what] for what, t in tests if not t["win"]]
    if tests and not losses:
        return f"Ship {name}: {value}, above {' and '.join(wins)}."
    beats = f"beats {' and '.join(wins)} but " if wins else ""
    return (
        f"{name[0].upper()}{name[1:]} scores {value}: it {beats}is not shown to beat "
        f"{' and '.join(losses) or 'anything'}."
    )


def gather(cfg, cells, root: Path) -> list[dict]:
    """One result per (model, checkpoint): per-seed values, mean +- std, and the test against the base model."""
    groups: dict[tuple[str, int], dict] = {}
    for cell in cells:
        g = groups.setdefault(
            (cell.model, cell.step),
            {
                "model": cell.model,
                "step": cell.step,
                "checkpoint": cell.checkpoint,
                "seeds": [],
                "failed_seeds": [],
                "values": {m: [] for m in cfg.metrics},
                "per_group": {},
                "correct": [],
            },
        )
        blended = _blend_results(root, cell.folder)
        if blended is not None:
            b = g.setdefault(
                "blend",
                {
                    "values": {m: [] for m in cfg.metrics},
                    "correct": [],
                    "weights": [],
                    "floor_values": {m: [] for m in cfg.metrics},
                    "floor_correct": [],
                },
            )
            b["correct"].append(blended[1])
            b["weights"].append(blended[2])
            b["floor_correct"].append(blended[4])
            for m in cfg.metrics:
                if m in blended[0]:
                    b["values"][m].append(blended[0][m])
                if m in blended[3]:
                    b["floor_values"][m].append(blended[3][m])
        result = _cell_results(root, cell.folder)
        if result is None:
            g["failed_seeds"].append(cell.seed)
            continue
        metrics, correct = result
        missing = [m for m in cfg.metrics if m not in metrics]
        if missing:
            raise DomainLMError(
                f"metrics {missing} are not computed "
                f"(available: {', '.join(k for k, v in metrics.items() if isinstance(v, float))})"
            )
        g["seeds"].append(cell.seed)
        g["correct"].append(correct)
        for m in cfg.metrics:
            g["values"][m].append(metrics[m])
        for name, v in metrics.get("per_group", {}).items():
            g["per_group"].setdefault(name, []).append(v["accuracy"])
    results = list(groups.values())
    for r in results:
        for m in cfg.metrics:
            if r["values"][m]:
                r[m] = dict(zip(("mean", "std"), mean_std(r["values"][m])))
        r["per_group"] = {k: float(np.mean(v)) for k, v in r["per_group"].items()}
    primary = cfg.metrics[0]
    for model in dict.fromkeys(r["model"] for r in results):
        base = next((r for r in results if r["model"] == model and r["step"] == 0), None)
        tested = [r for r in results if r["model"] == model and r["step"] and r["correct"]]
        if base is None or not base["correct"] or not tested:
            continue
        for r in tested:
            r["vs_base"] = compare(np.stack(r["correct"]), np.stack(base["correct"]))
            if primary in r and primary in base:
                r["vs_base"]["metric_difference"] = r[primary]["mean"] - base[primary]["mean"]
        for r, adjusted, worse in zip(
            tested, holm([r["vs_base"]["p_value"] for r in tested]), holm([r["vs_base"]["p_worse"] for r in tested])
        ):
            r["vs_base"]["p_holm"] = float(adjusted)
            r["vs_base"]["win"] = bool(adjusted < ALPHA and r["vs_base"]["difference"] > 0)
            r["vs_base"]["p_worse_holm"] = float(worse)
            r["vs_base"]["loss"] = bool(worse < ALPHA and r["vs_base"]["difference"] < 0)
    _test_blends(cfg, results)
    for r in results:
        del r["correct"]
    done = [r for r in results if primary in r]
    if done:
        best = max(done, key=lambda r: r[primary]["mean"])
        best["best"] = True
        best["star"] = bool(best.get("vs_base", {}).get("win"))
    return results


def conclusion(cfg, results: list[dict], floor: dict | None, split: str) -> str:
    primary = cfg.metrics[0]
    done = [r for r in results if primary in r]
    if not done:
        return "No cell finished: there is nothing to compare (see the failures below)."
    best = next(r for r in done if r.get("best"))
    cell = (
        f"{best['model']} {best['checkpoint']}, {pct(best[primary]['mean'])} ± {pct(best[primary]['std'])} over "
        f"{len(best['seeds'])} seed{'s' if len(best['seeds']) > 1 else ''}"
    )
    tested = [r for r in results if "vs_base" in r]
    wins = [r for r in tested if r["vs_base"]["win"]]
    losses = [r for r in tested if r["vs_base"].get("loss")]
    if best.get("star"):
        vs = best["vs_base"]
        base = next(r for r in done if r["model"] == best["model"] and r["step"] == 0)
        versus_base = (
            f"{best['model']} {best['checkpoint']} beats its base model ({pct(base[primary]['mean'])}) by "
            f"{100 * vs['metric_difference']:.1f} points "
            f"(Holm-adjusted p {'< 0.001' if vs['p_holm'] < 0.001 else '= ' + pval(vs['p_holm'])})"
        )
    elif wins:
        names = ", ".join(f"{r['model']} {r['checkpoint']}" for r in wins)
        versus_base = f"{names} {'beats its' if len(wins) == 1 else 'beat their'} base model after Holm adjustment"
    elif losses:
        said = ", ".join(
            f"{r['model']} {r['checkpoint']} ({100 * r['vs_base']['metric_difference']:+.1f} points, "
            f"Holm-adjusted p {pval(r['vs_base']['p_worse_holm'])})"
            for r in losses
        )
        versus_base = (
            f"no checkpoint beats its base model, and {said} "
            f"{'scores' if len(losses) == 1 else 'score'} lower than {'its' if len(losses) == 1 else 'their'} "
            "base model"
        )
    elif tested:
        versus_base = (
            f"no checkpoint is distinguishable from its base model "
            f"(smallest Holm-adjusted p = {min(r['vs_base']['p_holm'] for r in tested):.2f})"
        )
    else:
        versus_base = "no pretraining checkpoint was compared with its base model"
    floor_value = floor[split][primary] if floor else None
    if floor_value is not None and floor_value >= best[primary]["mean"]:
        return (
            f"Ship the classical floor ({floor['method']}): {primary} {pct(floor_value)} on {split}, "
            f"{100 * (floor_value - best[primary]['mean']):.1f} points above the best transformer cell ({cell}); "
            f"no transformer cell beats it, and {versus_base}."
        )

    def above_floor(r: dict) -> str:
        if floor_value is None:
            return ""
        return f", {100 * (r[primary]['mean'] - floor_value):.1f} points above the classical floor ({pct(floor_value)})"

    if best.get("star"):
        return (
            f"Ship {best['model']} {best['checkpoint']}: {primary} {cell.split(', ', 1)[1]}{above_floor(best)}; "
            f"{versus_base.replace(best['model'] + ' ' + best['checkpoint'], 'it', 1)}."
        )
    bases = [r for r in done if r["step"] == 0]
    if wins:  # a checkpoint beats its base, but another model's cell scores higher and is not shown to beat its own
        what = "a base model" if best["step"] == 0 else "a checkpoint not shown to beat its own base model"
        return (
            f"The best cell is {cell} ({what}){above_floor(best)}; "
            f"{versus_base}, but score{'s' if len(wins) == 1 else ''} lower."
        )
    if not bases:
        return f"The best cell is {cell}{above_floor(best)}; {versus_base}."
    keep = max(bases, key=lambda r: r[primary]["mean"])
    text = (
        f"{versus_base[0].upper()}{versus_base[1:]}: keep the base model {keep['model']} ({primary} "
        f"{pct(keep[primary]['mean'])} ± {pct(keep[primary]['std'])}{above_floor(keep)})"
    )
    return text + (f"; the best cell, {cell}, is within the noise." if keep is not best else ".")


def _task_lines(task: dict, floor: dict | None) -> list[str]:
    valid = (
        f"dev file {task['dev']} ({task['valid_rows']} rows) picks each cell's epoch"
        if task["dev"]
        else f"{task['valid_rows']} of them ({task['valid_rows'] / task['train_rows']:.0%}, split off per seed) "
        "pick each cell's epoch"
    )
    lines = [
        f"{task['task']} classification, {len(task['labels'])} labels: {', '.join(task['labels'])}",
        f"training data: {task['train']} ({task['train_rows']} rows; {valid} by {task['selection_metric']})",
        f"scored on: {task['test'] or task['dev']} ({task['test_rows'] or task['valid_rows']} rows), "
        f"ranked by {task['metric']}; "
        f"seeds {', '.join(map(str, task['seeds']))}; every cell fine-tuned with the same options",
    ]
    if floor:
        lines.append(
            f"floor: {floor['method']}, fitted on the same {floor['train_rows']} training rows, chosen on dev "
            f"({floor['seconds']} s)"
        )
    return lines


def summarize(cfg, cells, out: Writer, task: dict, floor: dict | None) -> dict:
    """table.md / table.csv / results.json / report.html and the plots."""
    root = out.root()
    split = task["evaluated_on"]
    results = gather(cfg, cells, root)
    primary = cfg.metrics[0]
    sentence = conclusion(cfg, results, floor, split)
    verdict = blend_verdict(cfg, results)
    if verdict:  # a blend that beats both parts is what to ship; one that does not is said beside the conclusion
        sentence = f"{verdict} Without the blend: {sentence}" if verdict.startswith("Ship") else f"{sentence} {verdict}"
    header, rows, csv_rows = table(cfg, results, floor, split)
    failures = [
        {"cell": c.folder, "error": (root / "cells" / c.folder / "FAILED").read_text(encoding="utf-8").split("\n")[0]}
        for c in cells
        if (root / "cells" / c.folder / "FAILED").is_file()
    ]
    out.write_json("failures.json", failures)
    out.write_json(
        "results.json",
        {"conclusion": sentence, "primary_metric": primary, "task": task, "floor": floor, "cells": results},
    )
    note = (
        f"Values in % on {split}: mean ± std over seeds, and each seed's value. "
        f"Δ vs base: difference of the {primary} means "
        "in points. p: one-sided test that the checkpoint's per-row correctness beats its base model's, accounting for "
        "both seed and test-row variance (two-level t-test); "
        "p (Holm): adjusted for the checkpoints compared per model. "
        f"* a win (adjusted p < {ALPHA}); † a loss (lower than its base model, adjusted one-sided p < {ALPHA}); "
        "★ the best cell, marked only when it beats its base after adjustment."
    )
    if any("blend" in r for r in results):
        note += (
            " `+ floor` rows: each cell's probabilities mixed with its own floor's, the weight chosen on its dev "
            "rows; Δ and p there are against the model alone (the test against the floor is in the conclusion)."
        )
    if len(cfg.seeds) < 3:
        note += " With fewer than 3 seeds the seed variance is barely estimable and the test rarely finds a difference."
    images = plots(cfg, results, floor, split, out)
    md = [f"# Sweep: {root.name}", "", f"**{sentence}**", "", "## Task", ""] + [
        f"- {x}" for x in _task_lines(task, floor)
    ]
    md += ["", "## Results", "", markdown_table(header, rows), "", note, ""]
    if failures:
        md += ["Failed cells:", ""] + [f"- {f['cell']}: {f['error']}" for f in failures] + [""]
    md += [f"![{p.stem}]({p.name})" for p in images]
    out.write_text("table.md", "\n".join(md) + "\n")
    table_csv = io.StringIO(newline="")
    csv.writer(table_csv).writerows(csv_rows)
    out.write_text("table.csv", table_csv.getvalue())
    blocks: list[tuple[str, object]] = [
        ("lead", sentence),
        ("h2", "Task"),
        ("ul", _task_lines(task, floor)),
        ("h2", "Results"),
        ("table", (header, rows)),
        ("note", note),
    ]
    blocks += [("p", f"failed: {f['cell']}: {f['error']}") for f in failures]
    blocks += [("img", images[0])]
    if len(images) > 1:
        blocks += [("h2", "Pretraining"), ("img", images[1])]
    out.write_text("report.html", html_page(f"Sweep: {root.name}", blocks))
    print(sentence)
    print(markdown_table(header, rows))
    print(f"report: {root / 'report.html'}")
    best = next((r for r in results if r.get("best")), None)
    return {"cells": results, "failures": failures, "best": best, "conclusion": sentence, "floor": floor}
