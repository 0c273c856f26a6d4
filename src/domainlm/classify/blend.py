"""`finetune --blend`: the weighted mean w x model + (1 - w) x floor of the transformer's and the classical floor's
probabilities, reported as a model of its own.

The weight is chosen on rows neither model trained on and that are not the test rows: the dev rows of a single run,
or the out-of-fold rows of `--folds` (every training row, scored by models that never saw it). The test rows only
ever see the chosen weight.
"""

from __future__ import annotations

import numpy as np

from domainlm.classify import metrics as M
from domainlm.classify.data import Dataset, targets
from domainlm.classify.report import score, write_outputs
from domainlm.classify.results import HELD_OUT, TEST_FILE, Scored
from domainlm.outputs import Writer

# the model's weight: 0 is the floor alone, 1 the transformer alone
WEIGHTS = np.round(np.linspace(0.0, 1.0, 21), 2)


def choose_weight(model: np.ndarray, floor: np.ndarray, rows: Dataset, labels: list[str], cfg) -> tuple[float, dict]:
    """The weight that maximises cfg.best_metric on `rows` (ties: the larger weight, the transformer's side), with
    that value for every weight tried."""
    values = {}
    for w in WEIGHTS[::-1]:
        probs = w * model + (1 - w) * floor
        thresholds = M.tune_thresholds(probs, targets(rows, labels, True)) if cfg.multilabel else None
        values[float(w)] = score(probs, rows, labels, cfg.multilabel, cfg.tolerant_k, thresholds)[cfg.best_metric]
    best = max(values, key=lambda w: (values[w], w))
    return best, values


def blend(
    cfg,
    selection: tuple[np.ndarray, np.ndarray, Dataset],
    chosen_on: str,
    labels: list[str],
    test: tuple[np.ndarray, np.ndarray, Dataset] | None = None,
    out: Writer | None = None,
) -> dict:
    """The weight chosen on `selection` (model probabilities, floor probabilities, rows) alone; the test rows are
    scored with it (and their predictions written as blend_test_*.jsonl)."""
    model, floor, rows = selection
    weight, values = choose_weight(model, floor, rows, labels, cfg)

    def tuned(w: float):  # multi-label thresholds of a mix, tuned on the selection rows too
        return M.tune_thresholds(w * model + (1 - w) * floor, targets(rows, labels, True)) if cfg.multilabel else None

    thresholds = tuned(weight)
    probs = weight * model + (1 - weight) * floor
    result = {
        "weight": weight,
        "chosen_on": chosen_on,
        "selection_rows": len(rows),
        "by_weight": values,
        chosen_on: score(probs, rows, labels, cfg.multilabel, cfg.tolerant_k, thresholds, cfg.ordinal),
    }
    if test is not None:
        t_model, t_floor, t_rows = test
        t_probs = weight * t_model + (1 - weight) * t_floor
        result["test"] = score(t_probs, t_rows, labels, cfg.multilabel, cfg.tolerant_k, thresholds, cfg.ordinal)
        # the two parts alone on the same rows, for the comparison in one place
        result["test_parts"] = {
            name: M.scalars(score(p, t_rows, labels, cfg.multilabel, cfg.tolerant_k, tuned(w)))
            for name, p, w in (("model", t_model, 1.0), ("floor", t_floor, 0.0))
        }
        if out is not None:
            write_outputs(out, "blend_test", t_rows, t_probs, labels, cfg.multilabel, result["test"], thresholds)
    if thresholds is not None:
        result["thresholds"] = [float(t) for t in thresholds]
    return result


def line(result: dict, metric: str) -> str:
    split = "test" if "test" in result else result["chosen_on"]
    text = (
        f"Blend {result['weight']:.2f} x model + {1 - result['weight']:.2f} x floor (weight chosen on "
        f"{result['selection_rows']} {result['chosen_on']} rows): {split} {metric} {result[split][metric]:.4f}"
    )
    if "test_parts" in result:
        parts = result["test_parts"]
        return text + f" (model alone {parts['model'][metric]:.4f}, floor alone {parts['floor'][metric]:.4f})."
    return text + "; measured on the rows that chose the weight, so optimistic."


def finetune_blend(
    cfg,
    labels: list[str],
    runs: list[Scored],
    floor: list[Scored],
    train: Dataset,
    held_out: list[np.ndarray] | None,
    ensemble: dict[str, np.ndarray] | None,
    test: Dataset | None,
    out: Writer,
) -> dict:
    """The blend of a `finetune` run, from the probabilities its models kept: a single run (the weight chosen on its
    dev rows) or a fold ensemble (on the out-of-fold rows; the --test rows scored by both ensembles). Written to
    blend.json (and blend_test_*.jsonl)."""
    if ensemble is None:  # one run: its dev split
        model, base = runs[0], floor[0]
        selection, chosen_on = (model.probs["dev"], base.probs["dev"], model.rows["dev"]), "dev"
        t = (model.probs["test"], base.probs["test"], test) if test is not None else None
    else:  # folds: every training row, scored by the fold models (and floors) that did not see it
        floor_oof = np.zeros_like(ensemble["oof"])
        for rows, base in zip(held_out, floor):
            floor_oof[rows] = base.probs[HELD_OUT]
        selection, chosen_on = (ensemble["oof"], floor_oof, train), "oof"
        t = None
        if test is not None:
            t = (ensemble["test"], np.mean([base.probs[TEST_FILE] for base in floor], axis=0), test)
    result = blend(cfg, selection, chosen_on, labels, t, out)
    out.write_json("blend.json", result)
    return result
