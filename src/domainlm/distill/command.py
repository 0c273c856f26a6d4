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

import time
from functools import partial

import numpy as np

from domainlm import checks, outputs
from domainlm.classify import metrics as M
from domainlm.classify.data import Dataset, Example, targets
from domainlm.classify.results import FLOOR, PLAIN, Scored, seed_folder
from domainlm.distill.config import DistillConfig
from domainlm.distill.loss import DistillClassifier, pack, soften
from domainlm.distill.teacher import CACHE, teacher_outputs, unlabeled_texts
from domainlm.outputs import Writer

DISTILL_OUTPUTS = (
    "config.yaml",
    "model",
    "adapter",
    "metrics.json",
    "report.md",
    "log.jsonl",
    "tensorboard",
    "*_predictions.jsonl",
    "*_bad_cases.jsonl",
    "*_confusion.png",
    "step-*",
    "seed-*",
    "plain",
    "floor",
    "distill.json",
    "distill.md",
    "teacher_cache",
)


def load_teacher(path: str):
    from domainlm.classify.runtime import load

    return load(path)


def distill(cfg: DistillConfig) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    inputs = {"--train": cfg.train, "--dev": cfg.dev, "--test": cfg.test, "--unlabeled": cfg.unlabeled}
    models = {"--teacher": cfg.teacher, "--student": cfg.student, "--corpus": cfg.corpus}
    with outputs.run_folder(
        cfg.out,
        "distill",
        patterns=DISTILL_OUTPUTS,
        overwrite=cfg.overwrite,
        keep=(CACHE,),
        inputs=inputs,
        models=models,
        legacy=outputs.config_with("teacher"),
    ) as out:
        return _distill(cfg, out)


def _distill(cfg: DistillConfig, out: Writer) -> dict:
    from domainlm.classify import command as recipe  # finetune's setup, train, finish
    from domainlm.classify.report import score
    from domainlm.distill.checks import check
    from domainlm.train.setup import make_accelerator, mixed_precision

    # ---- setup: the teacher's labels (read, not loaded), the task read by finetune's reader, the student checked
    found, errors = check(cfg)
    checks.first(errors)
    labels, task, ft = found.labels, found.task, found.finetune
    multilabel = cfg.task == "multilabel"
    extra = unlabeled_texts(cfg)
    cfg.precision = ft.precision = mixed_precision(cfg.precision)
    accelerator = make_accelerator(cfg.precision)
    splits = {seed: task.split(task.train, ft, seed) for seed in cfg.seeds}
    out.begin(cfg)

    # ---- teacher: every text any seed trains on, the unlabelled ones, dev and test, once
    rows = {f"fit-{seed}": fit.columns() for seed, (fit, _) in splits.items()}
    rows["unlabeled"] = (extra, None)
    speed = "test" if task.test is not None else f"dev-{cfg.seeds[0]}"
    rows.update({f"dev-{seed}": dev.columns() for seed, (_, dev) in splits.items()})
    if task.test is not None:
        rows["test"] = task.test.columns()
    probs, teacher_meta = teacher_outputs(
        cfg.teacher,
        rows,
        out,
        cfg.max_seq_len,
        cfg.teacher_batch_size,
        load_teacher,
        speed,
        hidden=bool(cfg.hidden_weight),
    )

    # ---- train: the distilled student (and the plain one) per seed
    evaluated = {"test": task.test} if task.test is not None else {}
    split = "test" if task.test is not None else "dev"
    runs = []
    for seed in cfg.seeds:
        fit, dev = splits[seed]
        folder = out if len(cfg.seeds) == 1 else out.sub(seed_folder(seed))
        student_rows = Dataset(fit.path, fit.examples + [Example(t, [], line=0) for t in extra])
        soft = soften(np.concatenate([probs[f"fit-{seed}"], probs["unlabeled"]]), cfg.temperature, multilabel)
        states = np.concatenate([probs[f"hidden-fit-{seed}"], probs["hidden-unlabeled"]]) if cfg.hidden_weight else None
        packed = pack(targets(fit, labels, multilabel), soft, multilabel, states)
        make = partial(
            DistillClassifier,
            n_labels=len(labels),
            temperature=cfg.temperature,
            alpha=cfg.alpha,
            hidden_weight=cfg.hidden_weight,
            teacher_width=0 if states is None else states.shape[1],
        )
        student = recipe.setup(
            ft,
            accelerator,
            found.student.tokenizer,
            labels,
            student_rows,
            dev,
            evaluated,
            seed,
            folder,
            make_model=make,
            fit_targets=packed,
        )
        run = {"seed": seed, "student": recipe.finish(student, recipe.train(student))}
        if cfg.plain:
            plain = recipe.setup(
                ft, accelerator, found.student.tokenizer, labels, fit, dev, evaluated, seed, folder.sub(PLAIN)
            )
            run["plain"] = recipe.finish(plain, recipe.train(plain))
        teacher_probs = probs["test" if task.test is not None else f"dev-{seed}"]
        thresholds = M.tune_thresholds(probs[f"dev-{seed}"], targets(dev, labels, True)) if multilabel else None
        run["teacher"] = Scored(
            score(teacher_probs, task.test if task.test is not None else dev, labels, multilabel, 2, thresholds),
            {split: teacher_probs},
            {split: evaluated.get("test", dev)},
            thresholds,
        )
        runs.append(run)
    if not accelerator.is_main_process:
        return {}
    floor = None
    if cfg.floor:  # seeds share the labelled rows: one floor, on the first seed's validation split
        from domainlm.classify import linear

        fit, dev = splits[cfg.seeds[0]]
        floor = linear.run(ft, fit, dev, evaluated, labels, cfg.seeds[0], out.sub(FLOOR))

    # ---- finish: each model's report, the comparison and the speeds
    for run in runs:
        for name, title in (("student", f"Distilled student {cfg.student}"), ("plain", f"Plain student {cfg.student}")):
            if name in run:
                recipe.write_run(run[name].folder, run[name].metrics, title, recipe.sections(run[name]), labels)
    if floor is not None:
        recipe.write_run(floor.folder, floor.metrics, "Linear floor", recipe.sections(floor), labels)
    result = finish(
        cfg, runs, split, teacher_meta, (task.test or splits[cfg.seeds[0]][1]).columns(), len(extra), floor, labels
    )
    out.write_json("distill.json", result)
    out.write_text("distill.md", report(cfg, result))
    print(report(cfg, result))
    return result


def finish(
    cfg: DistillConfig,
    runs: list[dict],
    split: str,
    teacher_meta: dict,
    speed_texts,
    unlabeled_rows: int,
    floor: Scored | None,
    labels: list[str],
) -> dict:
    """The table (teacher, student, plain student, the floor), the speeds and the paired tests, from the results
    the runs kept in memory."""
    from domainlm.classify.runtime import load
    from domainlm.stats import compare, holm

    metric = "f1_micro" if cfg.task == "multilabel" else "accuracy"
    multilabel = cfg.task == "multilabel"
    models = ["teacher", "student"] + (["plain"] if cfg.plain else []) + (["floor"] if floor else [])
    table = {}
    for name in models:
        values = (
            [floor.metrics[split][metric]]
            if name == "floor"
            else [r[name].metrics[split][metric] if name != "teacher" else r["teacher"].metrics[metric] for r in runs]
        )
        table[name] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "per_seed": values,
        }
    student = load(str(runs[0]["student"].folder.root()))
    texts, pairs = speed_texts
    student.predict(texts[:8], None if pairs is None else pairs[:8], 64, cfg.max_seq_len)  # warm up
    started = time.perf_counter()
    student.predict(texts, pairs, cfg.teacher_batch_size, cfg.max_seq_len)
    student_speed = len(texts) / max(time.perf_counter() - started, 1e-9)
    result = {
        "metric": metric,
        "split": split,
        "models": table,
        "temperature": cfg.temperature,
        "alpha": cfg.alpha,
        "unlabeled_rows": unlabeled_rows,
        "seeds": list(cfg.seeds),
        "speed_texts_per_s": {"teacher": teacher_meta.get("texts_per_s"), "student": student_speed},
        "runs": [
            {"seed": r["seed"], **{k: r[k].metrics for k in ("student", "plain", "teacher") if k in r}} for r in runs
        ],
    }
    if teacher_meta.get("texts_per_s"):
        result["speedup"] = student_speed / teacher_meta["texts_per_s"]
    # the sweep's two-level test on per-row correctness (seeds and rows both vary), Holm-corrected over the tests
    correct = {
        name: np.stack([r[name].correct(split, labels, multilabel) for r in runs])
        for name in ("student", "plain")
        if name in runs[0]
    }
    bases = {"plain": correct["plain"]} if "plain" in correct else {}
    if floor is not None:  # one floor for every seed
        bases["floor"] = floor.correct(split, labels, multilabel)[None, :]
    tests = {name: compare(correct["student"], base) for name, base in bases.items()}
    for (name, t), adjusted in zip(tests.items(), holm([t["p_value"] for t in tests.values()])):
        result[f"student_vs_{name}"] = {**t, "p_holm": float(adjusted)}
    return result


def report(cfg: DistillConfig, result: dict) -> str:
    m, split = result["metric"], result["split"]
    lines = [
        f"# Distillation: {cfg.teacher} -> {cfg.student}",
        "",
        f"T = {cfg.temperature}, alpha = {cfg.alpha} (hard-label share), {result['unlabeled_rows']} unlabelled texts, "
        f"seeds {', '.join(map(str, result['seeds']))}; {m} on {split}.",
        "",
        f"| model | {m} mean ± std | per seed | texts/s |",
        "| --- | --- | --- | --- |",
    ]
    speeds = result["speed_texts_per_s"]
    for name, v in result["models"].items():
        speed = speeds.get(name) if name != "plain" else speeds.get("student")
        lines.append(
            f"| {name} | {100 * v['mean']:.1f} ± {100 * v['std']:.1f} | "
            f"{' '.join(f'{100 * x:.1f}' for x in v['per_seed'])} | {speed:.1f} |"
            if speed
            else f"| {name} | {100 * v['mean']:.1f} ± {100 * v['std']:.1f} | "
            f"{' '.join(f'{100 * x:.1f}' for x in v['per_seed'])} | |"
        )
    for name, what in (("plain", "the plainly fine-tuned student"), ("floor", "the classical floor")):
        if f"student_vs_{name}" in result:
            t = result[f"student_vs_{name}"]
            lines += [
                "",
                f"Distilled student vs {what}: {100 * t['difference']:+.1f} points of per-row correctness "
                f"(95% CI {100 * t['ci95'][0]:+.1f} to {100 * t['ci95'][1]:+.1f}), one-sided p = {t['p_value']:.3f}, "
                f"Holm-adjusted {t['p_holm']:.3f} (two-level test over {t['seeds'][0]} seeds and {t['rows']} rows).",
            ]
    if "speedup" in result:
        lines += [
            "",
            f"The student answers {result['speedup']:.1f}x as many texts per second as the teacher on the same "
            f"texts (the teacher timed when its outputs were computed).",
        ]
    return "\n".join(lines) + "\n"
