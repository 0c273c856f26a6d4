"""`domainlm finetune | evaluate | predict`.

finetune: data -> validation split (or --dev) -> one run per seed or per fold -> best model by the validation
metric (early stopping) -> metrics on dev and --test, predictions, bad cases, report; mean and std over runs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from domainlm import checks, outputs
from domainlm import config as cfglib
from domainlm.classify import batching, linear
from domainlm.classify import metrics as M
from domainlm.classify.batching import encode, eval_batches
from domainlm.classify.config import EvaluateConfig, FinetuneConfig, PredictConfig
from domainlm.classify.data import (
    Columns,
    Dataset,
    check_labels,
    check_predict_paths,
    keep_line_order,
    kfold,
    label_list,
    read_examples,
    read_stdin_lines,
    split_validation,
    targets,
)
from domainlm.classify.model import Classifier, load_classifier, save_classifier
from domainlm.errors import DomainLMError
from domainlm.serve.runtime import Runtime, best_k, choose, thresholds_of
from domainlm.train.checkpoint import TrainState
from domainlm.train.logging import RunLogger
from domainlm.train.loop import LoopOptions, evaluate, shard_range, train_loop
from domainlm.train.setup import build_optimizer, build_scheduler, make_accelerator


def _columns(cfg) -> Columns:
    return Columns(cfg.text_column, cfg.pair_column, cfg.label_column, cfg.group_column, cfg.label_delimiter)


def score(probs: np.ndarray, data: Dataset, labels: list[str], multilabel: bool, tolerant_k: int,
          thresholds: np.ndarray | None = None) -> dict:
    gold = targets(data, labels, multilabel)
    groups = [ex.group or "" for ex in data.examples] if any(ex.group for ex in data.examples) else None
    if multilabel:
        return M.multilabel_metrics(probs, gold, labels, thresholds_of(len(labels), thresholds), groups)
    return M.multiclass_metrics(probs, gold, labels, tolerant_k, groups)


def write_outputs(out: Path, name: str, data: Dataset, probs: np.ndarray, labels: list[str], multilabel: bool,
                  metrics: dict, thresholds: np.ndarray | None) -> None:
    """<name>_predictions.jsonl (every row) and <name>_bad_cases.jsonl (wrong ones, with scores)."""
    with open(out / f"{name}_predictions.jsonl", "w", encoding="utf-8") as preds, \
            open(out / f"{name}_bad_cases.jsonl", "w", encoding="utf-8") as bad:
        for ex, p, chosen, best in zip(data.examples, probs, choose(probs, multilabel, thresholds), best_k(probs, 5)):
            predicted = [labels[j] for j in chosen]
            wrong = sorted(predicted) != sorted(ex.labels)
            row = {"line": ex.line, "text": ex.text, "gold": ex.labels, "predicted": predicted,
                   "scores": {labels[j]: round(float(p[j]), 4) for j in best}}
            if ex.group:
                row["group"] = ex.group
            line = json.dumps(row, ensure_ascii=False) + "\n"
            preds.write(line)
            if wrong:
                bad.write(line)
    if "confusion_matrix" in metrics:
        M.confusion_png(metrics["confusion_matrix"], labels, out / f"{name}_confusion.png")


def report_markdown(title: str, sections: dict[str, dict], labels: list[str]) -> str:
    lines = [f"# {title}", ""]
    for name, m in sections.items():
        lines += [f"## {name} ({m.get('n', '?')} rows)", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in M.scalars(m).items()]
        lines += ["", "| class | precision | recall | f1 | support |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |" for c, v in m["per_class"].items()]
        if "per_group" in m:
            keys = [k for k in next(iter(m["per_group"].values())) if k != "n"]
            lines += ["", "| group | n | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 2) + "|"]
            lines += [f"| {g} | {v['n']} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |" for g, v in m["per_group"].items()]
        if "confusion_matrix" in m:
            lines += ["", "Confusion matrix (rows gold, columns predicted):", "", "| | " + " | ".join(labels) + " |",
                      "| --- " * (len(labels) + 1) + "|"]
            lines += [f"| {labels[i]} | " + " | ".join(map(str, row)) + " |" for i, row in enumerate(m["confusion_matrix"])]
        lines.append("")
    return "\n".join(lines)


def _run(cfg: FinetuneConfig, accelerator, tokenizer, train: Dataset, dev: Dataset, test: Dataset | None,
         labels: list[str], seed: int, out: Path) -> dict:
    """One fine-tuning run: train with early stopping on dev, restore the best weights, evaluate, save.
    Every process trains on its share of each global batch and evaluates its shard of dev and test; the
    main process alone writes."""
    from accelerate.utils import set_seed

    set_seed(seed)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    log = print if main else (lambda *a, **k: None)
    with accelerator.main_process_first():  # a PaddleNLP folder is converted into --out once, by rank 0
        hf = load_classifier(cfg.model, labels, cfg.multilabel, cfg.method, cfg.lora_rank, cfg.lora_alpha, log=log,
                             work_dir=Path(cfg.out))
    checks.tokenizer_fits(tokenizer, getattr(hf, "config", None), cfg.model)
    model = Classifier(hf, cfg.multilabel)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.global_batch_size or cfg.batch_size * world
    if global_batch % (cfg.batch_size * world):
        raise DomainLMError(f"--global-batch-size {global_batch} is not a multiple of --batch-size {cfg.batch_size} "
                            f"x {world} processes")
    accumulation = global_batch // (cfg.batch_size * world)
    steps_per_epoch = batching.steps_per_epoch(len(train), global_batch, world * accumulation)
    if steps_per_epoch == 0:
        raise DomainLMError(f"{len(train)} training rows cannot fill {world * accumulation} micro batches of one step")
    max_steps = cfg.epochs * steps_per_epoch
    log(f"data: {len(train)} training rows, {max_steps} steps; global batch {global_batch} = {cfg.batch_size} x "
        f"{accumulation} accumulation x {world} processes")
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, max_steps, cfg.warmup_ratio, cfg.learning_rate,
                                cfg.learning_rate * cfg.min_lr_ratio, cfg.lr_decay)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = lambda: accelerator.unwrap_model(model)  # noqa: E731
    pad = tokenizer.pad_token_id or 0
    batches = batching.train_batches(encode(tokenizer, train, cfg.max_seq_len), targets(train, labels, cfg.multilabel),
                                     global_batch, pad, seed, rank, world, accumulation)
    dev_features, dev_y = encode(tokenizer, dev, cfg.max_seq_len), targets(dev, labels, cfg.multilabel)

    def scores(features, y) -> np.ndarray:
        """Probabilities for every row, each process scoring its contiguous shard in length order (batches of
        similar lengths pad little); the rows are put back in file order."""
        lengths = np.asarray([len(f["input_ids"]) for f in features])
        shards = [np.arange(*shard_range(len(features), r, world)) for r in range(world)]
        order = np.concatenate([s[np.argsort(lengths[s], kind="stable")] for s in shards])  # what evaluate gathers
        mine = order[slice(*shard_range(len(features), rank, world))]  # shards are contiguous: so is its part
        batches = eval_batches([features[i] for i in mine], cfg.batch_size * 2, pad, y[mine])
        with torch.random.fork_rng(devices=[]):  # evaluation must not move the training RNG
            gathered = evaluate(model, accelerator, batches).rows["scores"]
        probs = np.empty_like(gathered)
        probs[order] = gathered
        return probs

    logger = RunLogger(out, max_steps, 0, main, tensorboard=True)
    best = {"value": -math.inf, "step": 0, "state": None, "bad": 0}

    def on_eval(step: int) -> bool:
        probs = scores(dev_features, dev_y)
        m = score(probs, dev, labels, cfg.multilabel, cfg.tolerant_k)
        if cfg.best_metric not in m:
            raise DomainLMError(f"--metric {cfg.best_metric!r} is not computed; choose one of {', '.join(M.scalars(m))}")
        logger.log(step, "valid", M.scalars(m))
        if m[cfg.best_metric] > best["value"]:
            best.update(value=m[cfg.best_metric], step=step, bad=0, probs=probs,  # the restored model's, exactly
                        state={k: v.detach().clone() for k, v in unwrapped().state_dict().items()})
        else:
            best["bad"] += 1
        return bool(cfg.early_stopping_patience) and best["bad"] >= cfg.early_stopping_patience

    def on_snapshot(step: int) -> None:
        if main:
            save_classifier(unwrapped().hf, tokenizer, out / f"step-{step:06d}", labels, cfg.multilabel)

    options = LoopOptions(max_steps=max_steps, accumulation=accumulation, global_batch_size=global_batch,
                          logging_freq=cfg.logging_freq, eval_freq=cfg.eval_steps or steps_per_epoch, save_steps=cfg.save_steps)
    try:
        state = train_loop(model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator, batches=batches,
                           state=TrainState(), options=options, logger=logger, on_eval=on_eval, on_snapshot=on_snapshot)
        if best["state"] is None:  # the loop evaluates after its last step; only a run of no steps has not
            on_eval(state.step)
    finally:
        logger.close()
    unwrapped().load_state_dict(best["state"])
    log(f"best {cfg.best_metric} {best['value']:.4f} at step {best['step']} (stopped at step {state.step} of {max_steps})")

    probs = best["probs"]
    thresholds = M.tune_thresholds(probs, targets(dev, labels, True)) if cfg.multilabel else None
    result = {"seed": seed, "best_step": best["step"], "steps": state.step, "train_rows": len(train),
              "dev": score(probs, dev, labels, cfg.multilabel, cfg.tolerant_k, thresholds)}
    sections = {"dev": result["dev"]}
    if test is not None:
        test_probs = scores(encode(tokenizer, test, cfg.max_seq_len), targets(test, labels, cfg.multilabel))
        result["test"] = sections["test"] = score(test_probs, test, labels, cfg.multilabel, cfg.tolerant_k, thresholds)
    if main:
        write_outputs(out, "dev", dev, probs, labels, cfg.multilabel, result["dev"], thresholds)
        if test is not None:
            write_outputs(out, "test", test, test_probs, labels, cfg.multilabel, result["test"], thresholds)
        save_classifier(unwrapped().hf, tokenizer, out, labels, cfg.multilabel, thresholds)
        (out / "metrics.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
        (out / "report.md").write_text(report_markdown(f"Fine-tuning {cfg.model}", sections, labels), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the next seed or fold prepares a new model; let this one go
    return result


def finetune(cfg: FinetuneConfig) -> dict:
    from transformers.utils import logging as hf_logging

    from domainlm.data.tokenize import load_fast_tokenizer
    from domainlm.pretrain.model import load_config

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected; domainlm reports what matters
    out = outputs.folder(cfg.out)
    outputs.claim(out)
    outputs.check_earlier_run(out, "finetune", outputs.FINETUNE_OUTPUTS, "train", cfg.overwrite,
                              inputs=(cfg.model, cfg.train, cfg.dev, cfg.test))
    accelerator = make_accelerator(cfg.precision)
    columns = _columns(cfg)
    train = read_examples(cfg.train, columns, cfg.multilabel, skip_bad=cfg.skip_bad_rows)
    labels = label_list(train, cfg.labels or None)
    if len(labels) < 2 and not cfg.multilabel:
        raise DomainLMError(f"{cfg.train}: only one label ({labels}); a classifier needs at least two")
    dev_given = read_examples(cfg.dev, columns, cfg.multilabel, skip_bad=cfg.skip_bad_rows) if cfg.dev else None
    test = read_examples(cfg.test, columns, cfg.multilabel, skip_bad=cfg.skip_bad_rows) if cfg.test else None
    for data in (dev_given, test):
        if data is not None:
            check_labels(data, labels)
    linear_only = cfg.method == "linear"
    tokenizer = None if linear_only else load_fast_tokenizer(cfg.model, flag="--model")
    if not linear_only:
        checks.max_seq_len(load_config(cfg.model), cfg.max_seq_len, cfg.model)
    if accelerator.is_main_process:
        outputs.clear_known(out, outputs.FINETUNE_OUTPUTS, "finetune")  # an earlier run's files never mix with this one's
        cfglib.write(cfg, out)

    def split(data: Dataset, seed: int) -> tuple[Dataset, Dataset]:
        return (data, dev_given) if dev_given is not None else split_validation(data, cfg.valid_ratio, cfg.valid_max_rows, seed)

    def run(fit: Dataset, dev: Dataset, test: Dataset | None, seed: int, folder: Path) -> dict:
        splits.append((fit, dev, test))
        if linear_only:
            return linear.run(cfg, fit, dev, test, labels, seed, folder) if accelerator.is_main_process else {}
        return _run(cfg, accelerator, tokenizer, fit, dev, test, labels, seed, folder)

    runs, splits = [], []
    if cfg.folds:
        seed = cfg.seeds[0]
        for k, (fold_train, held_out) in enumerate(kfold(train, cfg.folds, seed), 1):
            runs.append(run(*split(fold_train, seed), held_out, seed, out / f"fold-{k}"))
        evaluated = "test"  # each fold's held-out part
    else:
        for seed in cfg.seeds:
            runs.append(run(*split(train, seed), test, seed, out if len(cfg.seeds) == 1 else out / f"seed-{seed}"))
        evaluated = "test" if test is not None else "dev"
    if linear_only and not accelerator.is_main_process:
        return {}
    summary = {"runs": len(runs), "evaluated_on": evaluated, "labels": labels, "skipped_rows": dict(train.skipped)}
    if cfg.floor and not linear_only and accelerator.is_main_process:
        summary["floor"] = linear.floor_beside(cfg, splits, labels, evaluated, out, single=len(runs) == 1)
    if len(runs) > 1:
        summary["mean_std"] = M.aggregate([r[evaluated] for r in runs])
        summary["per_run"] = [{"seed": r["seed"], **M.scalars(r[evaluated])} for r in runs]
        if accelerator.is_main_process:
            (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
            lines = [f"# {len(runs)} runs ({'folds' if cfg.folds else 'seeds'}), metrics on {evaluated}", "",
                     "| metric | mean | std |", "| --- | --- | --- |"]
            lines += [f"| {k} | {v['mean']:.4f} | {v['std']:.4f} |" for k, v in summary["mean_std"].items()]
            if "floor" in summary:
                lines += ["", linear.floor_line(summary["floor"], evaluated, cfg.best_metric)]
            (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        summary.update(runs[0])
    if accelerator.is_main_process:
        outputs.record(out, "finetune", outputs.FINETUNE_OUTPUTS)
    return summary


# ---- evaluate and predict ------------------------------------------------------------------------------

def _load(folder: str) -> Runtime:
    """Any model `predict` and `evaluate` take, behind one interface (serve.runtime): a `--method linear` model, an
    ONNX export (`domainlm export`, run by ONNX Runtime), or a PyTorch classifier."""
    from domainlm.serve.runtime import OnnxRuntime, TorchRuntime, is_export_dir

    if linear.is_linear(folder):
        return linear.LinearRuntime(linear.load(folder))
    if is_export_dir(folder):
        return OnnxRuntime(folder)
    return TorchRuntime(folder)


def _prepare(cfg, runtime: Runtime) -> None:
    """The label map must match the model's outputs; a transformer caps --max-seq-len at its positions."""
    checks.label_map(runtime.labels, runtime, cfg.model)
    if runtime.tokenizer is not None:  # a transformer (a linear model has no positions)
        cfg.max_seq_len = checks.max_seq_len(runtime.config, cfg.max_seq_len, cfg.model, cap=True)


def evaluate_command(cfg: EvaluateConfig) -> dict:
    out = outputs.folder(cfg.out)
    if outputs.inside(out, cfg.model):
        raise DomainLMError(f"--out {out} lies inside --model {cfg.model}: choose a folder of its own")
    outputs.claim(out)
    outputs.check_earlier_run(out, "evaluate", outputs.EVALUATE_OUTPUTS, "data", inputs=(cfg.model, cfg.data))
    runtime = _load(cfg.model)
    _prepare(cfg, runtime)
    labels, multilabel = runtime.labels, runtime.multilabel
    data = read_examples(cfg.data, _columns(cfg), multilabel, skip_bad=cfg.skip_bad_rows)
    unknown = sorted({label for ex in data.examples for label in ex.labels} - set(labels))
    if unknown:
        raise DomainLMError(f"{cfg.data}: labels {unknown} are not among the model's labels ({', '.join(labels)})")
    probs = runtime.predict(*data.columns(), cfg.batch_size, cfg.max_seq_len, progress=True)
    thresholds = runtime.thresholds if multilabel else None
    metrics = score(probs, data, labels, multilabel, cfg.tolerant_k, thresholds)
    outputs.clear_known(out, outputs.EVALUATE_OUTPUTS, "evaluate")
    write_outputs(out, "eval", data, probs, labels, multilabel, metrics, thresholds)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(f"Evaluation of {cfg.model} on {cfg.data}", {"eval": metrics}, labels), encoding="utf-8")
    cfglib.write(cfg, out)
    outputs.record(out, "evaluate", outputs.EVALUATE_OUTPUTS)
    return metrics


def predict_command(cfg: PredictConfig) -> int:
    from domainlm.classify.data import Example

    check_predict_paths(cfg.input, cfg.out)
    runtime = _load(cfg.model)
    _prepare(cfg, runtime)
    if cfg.input == "-":
        data = Dataset("<stdin>", [Example(text, [], line=i) for i, text in read_stdin_lines(getattr(sys.stdin, "buffer", sys.stdin))])
    else:
        columns = Columns(cfg.text_column, cfg.pair_column, "label", None)
        data = read_examples(cfg.input, columns, runtime.multilabel, require_labels=False, skip_flag=None)
    probs = runtime.predict(*data.columns(), cfg.batch_size, cfg.max_seq_len, progress=True)
    # a file is written beside its name and renamed when complete: a failed run leaves no half file
    partial = None if cfg.out == "-" else Path(cfg.out).with_name(f".{Path(cfg.out).name}.partial")
    sink = sys.stdout if partial is None else open(partial, "w", encoding="utf-8")  # noqa: SIM115
    try:
        labels = runtime.labels
        lines = [json.dumps({"text": ex.text, "labels": [labels[j] for j in chosen],
                             "scores": {labels[j]: round(float(p[j]), 4) for j in best}}, ensure_ascii=False) + "\n"
                 for ex, p, chosen, best in zip(data.examples, probs, runtime.choose(probs), best_k(probs, cfg.top_k))]
        sink.write("".join(keep_line_order(data, lines) if cfg.input == "-" else lines))
    except BaseException:
        if partial is not None:
            sink.close()
            partial.unlink(missing_ok=True)
        raise
    if partial is not None:
        sink.close()
        partial.replace(cfg.out)
    return len(data)
