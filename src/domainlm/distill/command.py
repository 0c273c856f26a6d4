"""`domainlm distill`: a large teacher's knowledge in a small student.

setup: options, the teacher's label map (read, not loaded), the labelled rows and their validation split, the
unlabelled texts -> teacher: its probabilities for every training and unlabelled text (and dev and test), once,
batched, cached in --out/teacher_cache -> train: per seed, the student by finetune's recipe (classify.command._run:
the shared loop, early stopping on dev, the best weights saved as a normal classifier folder) on hard labels mixed
with the teacher's soft targets; with --plain, the same student fine-tuned plainly -> finish: teacher vs student
(vs plain student, vs the classical floor fitted on the same rows; Holm-corrected paired tests) on dev/test, and
the inference speed of teacher and student on the same texts.
"""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from pathlib import Path

import numpy as np

from domainlm import config as cfglib
from domainlm import outputs
from domainlm.classify import metrics as M
from domainlm.classify.data import (
    Columns,
    Dataset,
    Example,
    check_labels,
    read_examples,
    split_validation,
    targets,
)
from domainlm.distill.config import STUDENT_GROUPS, DistillConfig
from domainlm.distill.loss import DistillClassifier, pack, soften
from domainlm.distill.teacher import model_labels, teacher_outputs, unlabeled_texts
from domainlm.errors import DomainLMError

DISTILL_OUTPUTS = ("config.yaml", "model", "metrics.json", "report.md", "log.jsonl", "tensorboard", "*_predictions.jsonl",
                   "*_bad_cases.jsonl", "*_confusion.png", "seed-*", "plain", "floor", "distill.json", "distill.md")


def student_config(cfg: DistillConfig, out: Path):
    """The student's fine-tuning options: finetune's recipe with distill's values."""
    from domainlm.classify.config import FinetuneConfig

    shared = [f.name for group in STUDENT_GROUPS for f in dataclasses.fields(group)]
    shared += ["train", "dev", "test", "task", "valid_ratio", "max_seq_len", "batch_size", "epochs",
               "early_stopping_patience"]
    return FinetuneConfig(model=cfg.student, out=str(out), floor=False, seeds=list(cfg.seeds),
                          **{k: getattr(cfg, k) for k in shared})


def load_teacher(path: str):
    from domainlm.classify.runtime import load

    return load(path)


def distill(cfg: DistillConfig) -> dict:
    from transformers.utils import logging as hf_logging

    from domainlm.classify import command as recipe  # finetune's setup, train, finish
    from domainlm.classify.report import score
    from domainlm.interop.tokenizer import load_fast_tokenizer
    from domainlm.train.setup import make_accelerator, mixed_precision

    hf_logging.set_verbosity_error()
    # ---- setup
    out = outputs.folder(cfg.out)
    outputs.claim(out)
    outputs.check_earlier_run(out, "distill", DISTILL_OUTPUTS, "teacher", cfg.overwrite)
    labels, teacher_multilabel = model_labels(cfg.teacher)
    multilabel = cfg.task == "multilabel"
    if teacher_multilabel != multilabel:
        raise DomainLMError(f"--teacher {cfg.teacher} is a {'multilabel' if teacher_multilabel else 'multiclass'} "
                            f"classifier but --task is {cfg.task}")
    columns = Columns(cfg.text_column, cfg.pair_column, cfg.label_column, None, cfg.label_delimiter)
    train = read_examples(cfg.train, columns, multilabel)
    unknown = sorted({label for ex in train.examples for label in ex.labels} - set(labels))
    if unknown:
        raise DomainLMError(f"--teacher {cfg.teacher} predicts {', '.join(labels)}; --train {cfg.train} has labels "
                            f"{unknown} it does not know: distil from a teacher trained on these labels")
    dev_given = read_examples(cfg.dev, columns, multilabel) if cfg.dev else None
    test = read_examples(cfg.test, columns, multilabel) if cfg.test else None
    for data in (dev_given, test):
        if data is not None:
            check_labels(data, labels)
    extra = unlabeled_texts(cfg)
    tokenizer = load_fast_tokenizer(cfg.student, flag="--student")
    cfg.precision = mixed_precision(cfg.precision)
    accelerator = make_accelerator(cfg.precision)
    ft = student_config(cfg, out)
    splits = {seed: (train, dev_given) if dev_given is not None else split_validation(train, cfg.valid_ratio, 0, seed)
              for seed in cfg.seeds}
    if accelerator.is_main_process:
        outputs.clear_known(out, DISTILL_OUTPUTS)
        out.mkdir(parents=True, exist_ok=True)
        cfglib.write(cfg, out)

    # ---- teacher: every text any seed trains on, the unlabelled ones, dev and test, once
    rows = {f"fit-{seed}": fit.columns() for seed, (fit, _) in splits.items()}
    rows["unlabeled"] = (extra, None)
    speed = "test" if test is not None else f"dev-{cfg.seeds[0]}"
    rows.update({f"dev-{seed}": dev.columns() for seed, (_, dev) in splits.items()})
    if test is not None:
        rows["test"] = test.columns()
    probs, teacher_meta = teacher_outputs(cfg.teacher, rows, out, cfg.max_seq_len, cfg.teacher_batch_size,
                                          load_teacher, speed, hidden=bool(cfg.hidden_weight))

    # ---- train: the distilled student (and the plain one) per seed
    runs = []
    for seed in cfg.seeds:
        fit, dev = splits[seed]
        folder = out if len(cfg.seeds) == 1 else out / f"seed-{seed}"
        student_rows = Dataset(fit.path, fit.examples + [Example(t, [], line=0) for t in extra])
        soft = soften(np.concatenate([probs[f"fit-{seed}"], probs["unlabeled"]]), cfg.temperature, multilabel)
        states = np.concatenate([probs[f"hidden-fit-{seed}"], probs["hidden-unlabeled"]]) if cfg.hidden_weight else None
        packed = pack(targets(fit, labels, multilabel), soft, multilabel, states)
        make = partial(DistillClassifier, n_labels=len(labels), temperature=cfg.temperature, alpha=cfg.alpha,
                       hidden_weight=cfg.hidden_weight, teacher_width=0 if states is None else states.shape[1])
        student = recipe.setup(ft, accelerator, tokenizer, labels, student_rows, dev, test, seed, folder,
                               make_model=make, fit_targets=packed)
        run = {"seed": seed, "student": recipe.finish(student, recipe.train(student))}
        if cfg.plain:
            plain = recipe.setup(ft, accelerator, tokenizer, labels, fit, dev, test, seed, folder / "plain")
            run["plain"] = recipe.finish(plain, recipe.train(plain))
        split = "test" if test is not None else "dev"
        teacher_probs = probs["test" if test is not None else f"dev-{seed}"]
        run["teacher"] = score(teacher_probs, test if test is not None else dev, labels, multilabel, 2,
                               M.tune_thresholds(probs[f"dev-{seed}"], targets(dev, labels, True)) if multilabel else None)
        run["folder"] = str(folder)
        runs.append(run)
    if not accelerator.is_main_process:
        return {}
    floor = None
    if cfg.floor:  # seeds share the labelled rows: one floor, on the first seed's validation split
        from domainlm.classify import linear

        fit, dev = splits[cfg.seeds[0]]
        floor = out / "floor"
        linear.run(ft, fit, dev, test, labels, cfg.seeds[0], floor)

    # ---- finish: the comparison and the speeds
    result = finish(cfg, runs, split, teacher_meta, (test or splits[cfg.seeds[0]][1]).columns(), len(extra), floor)
    (out / "distill.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "distill.md").write_text(report(cfg, result), encoding="utf-8")
    print(report(cfg, result))
    return result


def finish(cfg: DistillConfig, runs: list[dict], split: str, teacher_meta: dict, speed_texts, unlabeled_rows: int,
           floor: Path | None = None) -> dict:
    """The table (teacher, student, plain student, the floor in `floor`), the speeds and the paired tests."""
    from domainlm.classify.runtime import load

    metric = "f1_micro" if cfg.task == "multilabel" else "accuracy"
    models = ["teacher", "student"] + (["plain"] if cfg.plain else []) + (["floor"] if floor else [])
    floor_metrics = json.loads((floor / "metrics.json").read_text(encoding="utf-8")) if floor else None
    table = {}
    for name in models:
        values = ([floor_metrics[split][metric]] if name == "floor" else
                  [r[name][split][metric] if name != "teacher" else r["teacher"][metric] for r in runs])
        table[name] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                       "per_seed": values}
    student = load(str(Path(runs[0]["folder"])))
    texts, pairs = speed_texts
    student.predict(texts[:8], None if pairs is None else pairs[:8], 64, cfg.max_seq_len)  # warm up
    started = time.perf_counter()
    student.predict(texts, pairs, cfg.teacher_batch_size, cfg.max_seq_len)
    student_speed = len(texts) / max(time.perf_counter() - started, 1e-9)
    result = {"metric": metric, "split": split, "models": table, "temperature": cfg.temperature, "alpha": cfg.alpha,
              "unlabeled_rows": unlabeled_rows, "seeds": list(cfg.seeds),
              "speed_texts_per_s": {"teacher": teacher_meta.get("texts_per_s"), "student": student_speed},
              "runs": [{k: v for k, v in r.items() if k != "folder"} for r in runs]}
    if teacher_meta.get("texts_per_s"):
        result["speedup"] = student_speed / teacher_meta["texts_per_s"]
    # the sweep's two-level test on per-row correctness (seeds and rows both vary), Holm-corrected over the tests
    from domainlm.classify.report import read_correctness
    from domainlm.sweep.stats import compare, holm

    def correct(sub: str) -> np.ndarray:
        return np.stack([read_correctness(Path(r["folder"]) / sub / f"{split}_predictions.jsonl")[0] for r in runs])

    student, bases = correct(""), {}
    if cfg.plain:
        bases["plain"] = correct("plain")
    if floor:  # one floor for every seed
        bases["floor"] = read_correctness(floor / f"{split}_predictions.jsonl")[0][None, :]
    tests = {name: compare(student, base) for name, base in bases.items()}
    for (name, t), adjusted in zip(tests.items(), holm([t["p_value"] for t in tests.values()])):
        result[f"student_vs_{name}"] = {**t, "p_holm": float(adjusted)}
    return result


def report(cfg: DistillConfig, result: dict) -> str:
    m, split = result["metric"], result["split"]
    lines = [f"# Distillation: {cfg.teacher} -> {cfg.student}", "",
             f"T = {cfg.temperature}, alpha = {cfg.alpha} (hard-label share), {result['unlabeled_rows']} unlabelled texts, "
             f"seeds {', '.join(map(str, result['seeds']))}; {m} on {split}.", "",
             f"| model | {m} mean ± std | per seed | texts/s |", "| --- | --- | --- | --- |"]
    speeds = result["speed_texts_per_s"]
    for name, v in result["models"].items():
        speed = speeds.get(name) if name != "plain" else speeds.get("student")
        lines.append(f"| {name} | {100 * v['mean']:.1f} ± {100 * v['std']:.1f} | "
                     f"{' '.join(f'{100 * x:.1f}' for x in v['per_seed'])} | {speed:.1f} |" if speed else
                     f"| {name} | {100 * v['mean']:.1f} ± {100 * v['std']:.1f} | "
                     f"{' '.join(f'{100 * x:.1f}' for x in v['per_seed'])} | |")
    for name, what in (("plain", "the plainly fine-tuned student"), ("floor", "the classical floor")):
        if f"student_vs_{name}" in result:
            t = result[f"student_vs_{name}"]
            lines += ["", f"Distilled student vs {what}: {100 * t['difference']:+.1f} points of per-row correctness "
                          f"(95% CI {100 * t['ci95'][0]:+.1f} to {100 * t['ci95'][1]:+.1f}), one-sided p = {t['p_value']:.3f}, "
                          f"Holm-adjusted {t['p_holm']:.3f} (two-level test over {t['seeds'][0]} seeds and {t['rows']} rows)."]
    if "speedup" in result:
        lines += ["", f"The student answers {result['speedup']:.1f}x as many texts per second as the teacher on the same "
                      f"texts (the teacher timed when its outputs were computed)."]
    return "\n".join(lines) + "\n"
