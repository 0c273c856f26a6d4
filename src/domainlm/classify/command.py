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
from domainlm.classify import batching, blend, ensemble, linear
from domainlm.classify import metrics as M
from domainlm.classify.batching import encode, eval_batches
from domainlm.classify.config import EvaluateConfig, FinetuneConfig, PredictConfig
from domainlm.classify.data import (
    Columns,
    Dataset,
    check_labels,
    check_predict_paths,
    fold_indices,
    kfold,
    label_list,
    read_examples,
    read_stdin_lines,
    split_validation,
    targets,
)
from domainlm.classify.metrics import best_k
from domainlm.classify.model import Classifier, enable_checkpointing, load_classifier, save_classifier
from domainlm.classify.report import score, write_outputs, write_run
from domainlm.classify.runtime import load
from domainlm.errors import DomainLMError
from domainlm.train.checkpoint import TrainState
from domainlm.train.logging import RunLogger
from domainlm.train.loop import LoopOptions, evaluate, shard_range, train_loop
from domainlm.train.setup import build_optimizer, build_scheduler, make_accelerator


def ordered_labels(labels: list[str]) -> list[str]:
    """An ordinal scale's order when none is given: numeric labels by value (sorted text would put 10 before 2)."""
    try:
        return sorted(labels, key=float)
    except ValueError:
        raise DomainLMError(f"--ordinal: the labels ({', '.join(labels)}) are not numbers; give their order with "
                            "--labels") from None


def _run(cfg: FinetuneConfig, accelerator, tokenizer, train: Dataset, dev: Dataset, test: Dataset | None,
         labels: list[str], seed: int, out: Path, make_model=Classifier, train_targets: np.ndarray | None = None) -> dict:
    """One fine-tuning run: train with early stopping on dev, restore the best weights, evaluate, save.
    Every process trains on its share of each global batch and evaluates its shard of dev and test; the
    main process alone writes. `make_model(hf, multilabel)` and `train_targets` (one row per training row) let
    another objective (distillation) train by the same recipe."""
    from accelerate.utils import set_seed

    set_seed(seed)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
    log = print if main else (lambda *a, **k: None)
    with accelerator.main_process_first():  # a PaddleNLP folder is converted into --out once, by rank 0
        hf = load_classifier(cfg.model, labels, cfg.multilabel, cfg.method, cfg.lora_rank, cfg.lora_alpha, log=log,
                             work_dir=Path(cfg.out))
    if cfg.gradient_checkpointing:
        enable_checkpointing(hf)
    model = make_model(hf, cfg.multilabel)
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
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                                cfg.adam_epsilon, cfg.layer_lr_decay)
    scheduler = build_scheduler(optimizer, max_steps, cfg.warmup_ratio, cfg.learning_rate,
                                cfg.learning_rate * cfg.min_lr_ratio, cfg.lr_decay)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = lambda: accelerator.unwrap_model(model)  # noqa: E731
    pad = tokenizer.pad_token_id or 0
    y = targets(train, labels, cfg.multilabel) if train_targets is None else train_targets
    batches = batching.train_batches(encode(tokenizer, train, cfg.max_seq_len), y,
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
        m = score(probs, dev, labels, cfg.multilabel, cfg.tolerant_k, ordinal=cfg.ordinal)
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
            save_classifier(unwrapped().hf, tokenizer, out / f"step-{step:06d}", labels, cfg.multilabel,
                            settings=cfg.inference_settings())

    options = LoopOptions(max_steps=max_steps, accumulation=accumulation, global_batch_size=global_batch,
                          max_grad_norm=cfg.max_grad_norm, logging_freq=cfg.logging_freq,
                          eval_freq=cfg.eval_steps or steps_per_epoch, save_steps=cfg.save_steps)
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
              "dev": score(probs, dev, labels, cfg.multilabel, cfg.tolerant_k, thresholds, cfg.ordinal)}
    sections = {"dev": result["dev"]}
    if test is not None:
        test_probs = scores(encode(tokenizer, test, cfg.max_seq_len), targets(test, labels, cfg.multilabel))
        result["test"] = sections["test"] = score(test_probs, test, labels, cfg.multilabel, cfg.tolerant_k, thresholds, cfg.ordinal)
    if main:
        write_outputs(out, "dev", dev, probs, labels, cfg.multilabel, result["dev"], thresholds)
        if test is not None:
            write_outputs(out, "test", test, test_probs, labels, cfg.multilabel, result["test"], thresholds)
        save_classifier(unwrapped().hf, tokenizer, out, labels, cfg.multilabel, thresholds, cfg.inference_settings())
        write_run(out, result, f"Fine-tuning {cfg.model}", sections, labels)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the next seed or fold prepares a new model; let this one go
    return result


def finetune(cfg: FinetuneConfig) -> dict:
    from transformers.utils import logging as hf_logging

    from domainlm.interop.tokenizer import load_fast_tokenizer
    from domainlm.pretrain.model import load_config

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected; domainlm reports what matters
    out = outputs.folder(cfg.out)
    outputs.claim(out)
    outputs.check_earlier_run(out, "finetune", outputs.FINETUNE_OUTPUTS, "train", cfg.overwrite)
    accelerator = make_accelerator(cfg.precision)
    columns = Columns.of(cfg)
    train = read_examples(cfg.train, columns, cfg.multilabel, skip_bad=cfg.skip_bad_rows)
    labels = label_list(train, cfg.labels or None)
    if cfg.ordinal and not cfg.labels:
        labels = ordered_labels(labels)
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
        outputs.clear_known(out, outputs.FINETUNE_OUTPUTS)  # an earlier run's files never mix with this one's
        out.mkdir(parents=True, exist_ok=True)
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
        held_out_rows = fold_indices(train, cfg.folds, seed)
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
    if cfg.folds and accelerator.is_main_process:
        summary.update(ensemble.cross_validation_outputs(cfg, train, held_out_rows, test, labels, out, load))
    if cfg.blend and accelerator.is_main_process:
        summary["blend"] = blend.finetune_blend(cfg, out, load, labels, splits, train,
                                                held_out_rows if cfg.folds else None, test)
        blended = blend.line(summary["blend"], cfg.best_metric)
        print(blended)
        if not cfg.folds:  # one run: beside the floor in its metrics and report
            metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
            metrics["blend"] = summary["blend"]
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
            with open(out / "report.md", "a", encoding="utf-8") as f:
                f.write("\n" + blended + "\n")
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
            if "oof" in summary:
                lines += ensemble.summary_lines(summary, cfg.best_metric)
            if "blend" in summary:
                lines += ["", blend.line(summary["blend"], cfg.best_metric)]
            (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        summary.update(runs[0])
    return summary


# ---- evaluate and predict ------------------------------------------------------------------------------

def evaluate_command(cfg: EvaluateConfig) -> dict:
    out = outputs.folder(cfg.out)
    if outputs.inside(out, cfg.model):
        raise DomainLMError(f"--out {out} lies inside --model {cfg.model}: choose a folder of its own")
    outputs.claim(out)
    outputs.check_earlier_run(out, "evaluate", outputs.EVALUATE_OUTPUTS, "data")
    runtime = load(cfg.model, device=cfg.device, max_seq_len=cfg.max_seq_len)
    labels, multilabel = runtime.labels, runtime.multilabel
    data = read_examples(cfg.data, Columns.of(cfg, runtime), multilabel, skip_bad=cfg.skip_bad_rows)
    unknown = sorted({label for ex in data.examples for label in ex.labels} - set(labels))
    if unknown:
        raise DomainLMError(f"{cfg.data}: labels {unknown} are not among the model's labels ({', '.join(labels)})")
    probs = runtime.predict(*data.columns(), cfg.batch_size, progress=True)
    thresholds = runtime.thresholds if multilabel else None
    metrics = score(probs, data, labels, multilabel, cfg.tolerant_k, thresholds, cfg.ordinal)
    outputs.clear_known(out, outputs.EVALUATE_OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out, "eval", data, probs, labels, multilabel, metrics, thresholds)
    write_run(out, metrics, f"Evaluation of {cfg.model} on {cfg.data}", {"eval": metrics}, labels)
    cfglib.write(cfg, out)
    return metrics


def predict_command(cfg: PredictConfig) -> int:
    from domainlm.classify.data import Example

    check_predict_paths(cfg.input, cfg.out)
    runtime = load(cfg.model, device=cfg.device, max_seq_len=cfg.max_seq_len)
    if cfg.input == "-":
        data = Dataset("<stdin>", [Example(text, [], line=i) for i, text in read_stdin_lines(getattr(sys.stdin, "buffer", sys.stdin))])
    else:
        columns = Columns.of(cfg, runtime)
        data = read_examples(cfg.input, columns, runtime.multilabel, require_labels=False, skip_flag=None)
    probs = runtime.predict(*data.columns(), cfg.batch_size, progress=True)
    # a file is written beside its name and renamed when complete: a failed run leaves no half file
    partial = None if cfg.out == "-" else Path(cfg.out).with_name(f".{Path(cfg.out).name}.partial")
    sink = sys.stdout if partial is None else open(partial, "w", encoding="utf-8")  # noqa: SIM115
    try:
        labels = runtime.labels
        lines = [json.dumps({"text": ex.text, "labels": [labels[j] for j in chosen],
                             "scores": {labels[j]: round(float(p[j]), 4) for j in best}}, ensure_ascii=False) + "\n"
                 for ex, p, chosen, best in zip(data.examples, probs, runtime.choose(probs), best_k(probs, cfg.top_k))]
        sink.write("".join(lines))
    except BaseException:
        if partial is not None:
            sink.close()
            partial.unlink(missing_ok=True)
        raise
    if partial is not None:
        sink.close()
        partial.replace(cfg.out)
    return len(data)
