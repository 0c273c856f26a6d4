"""`domainlm finetune | evaluate | predict`.

finetune: data -> validation split (or --dev) -> one run per seed or per fold -> best model by the validation
metric (early stopping) -> metrics on dev and --test, predictions, bad cases, report; mean and std over runs.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
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
    keep_line_order,
    kfold,
    label_list,
    ordered_labels,
    read_examples,
    read_stdin_lines,
    split_validation,
    targets,
)
from domainlm.classify.metrics import best_k
from domainlm.classify.model import (
    Classifier,
    enable_checkpointing,
    load_classifier,
    packing_ready,
    save_classifier,
)
from domainlm.classify.report import score, write_outputs, write_run, write_summary
from domainlm.classify.runtime import load
from domainlm.errors import DomainLMError
from domainlm.train.checkpoint import TrainState
from domainlm.train.logging import RunLogger
from domainlm.train.loop import LoopOptions, evaluate, shard_range, train_loop
from domainlm.train.setup import build_optimizer, build_scheduler, make_accelerator, mixed_precision


@dataclass
class Task:
    """The task data, read (and checked) once and passed on: training rows, the --dev and --test rows, labels."""
    train: Dataset
    dev: Dataset | None
    test: Dataset | None
    labels: list[str]

    @classmethod
    def read(cls, cfg: FinetuneConfig) -> Task:
        columns = Columns.of(cfg)
        read = lambda path: read_examples(path, columns, cfg.multilabel, skip_bad=cfg.skip_bad_rows) if path else None  # noqa: E731
        train = read(cfg.train)
        labels = label_list(train, cfg.labels or None)
        if cfg.ordinal and not cfg.labels:
            labels = ordered_labels(labels)
        if len(labels) < 2 and not cfg.multilabel:
            raise DomainLMError(f"{cfg.train}: only one label ({labels}); a classifier needs at least two")
        dev, test = read(cfg.dev), read(cfg.test)
        for data in (dev, test):
            if data is not None:
                check_labels(data, labels)
        return cls(train, dev, test, labels)

    def split(self, rows: Dataset, cfg: FinetuneConfig, seed: int) -> tuple[Dataset, Dataset]:
        """(rows to fit, rows to validate on): --dev when given, else a share of `rows` held out."""
        return (rows, self.dev) if self.dev is not None else split_validation(rows, cfg.valid_ratio, cfg.valid_max_rows, seed)


@dataclass
class EarlyStopping:
    """The best validation score so far, the weights and dev probabilities that gave it, and how many evaluations
    in a row did not beat it."""
    metric: str
    patience: int  # 0: never stop early
    value: float = -math.inf
    step: int = 0
    bad: int = 0
    state: dict | None = None
    probs: np.ndarray | None = None

    def update(self, metrics: dict, step: int, model: torch.nn.Module, probs: np.ndarray) -> bool:
        """Record an evaluation (its metrics, the model, its dev probabilities); True when training should stop."""
        if self.metric not in metrics:
            raise DomainLMError(f"--metric {self.metric!r} is not computed; choose one of {', '.join(M.scalars(metrics))}")
        if metrics[self.metric] > self.value:  # the restored model's weights and probabilities, exactly
            self.value, self.step, self.bad, self.probs = metrics[self.metric], step, 0, probs
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad += 1
        return bool(self.patience) and self.bad >= self.patience


@dataclass
class Run:
    """One fine-tuning run (a seed or a fold): everything setup() builds and train()/finish() use. Every process
    trains on its share of each global batch and evaluates its shard of dev and test; the main process alone writes."""
    cfg: FinetuneConfig
    accelerator: object
    tokenizer: object
    labels: list[str]
    seed: int
    out: Path
    fit: Dataset
    dev: Dataset
    test: Dataset | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    batches: object
    options: LoopOptions
    logger: RunLogger
    best: EarlyStopping
    packed: bool = False  # batches are packed token streams (see classify.model.packed_logits)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def hf(self):
        return self.accelerator.unwrap_model(self.model).hf

    def encode(self, data: Dataset) -> tuple[list[dict], np.ndarray]:
        return encode(self.tokenizer, data, self.cfg.max_seq_len), targets(data, self.labels, self.cfg.multilabel)

    def scores(self, data: Dataset) -> np.ndarray:
        """Probabilities for every row, each process scoring its contiguous shard in length order (batches of
        similar lengths pad little); the rows are put back in file order."""
        features, y = self.encode(data)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        lengths = np.asarray([len(f["input_ids"]) for f in features])
        shards = [np.arange(*shard_range(len(features), r, world)) for r in range(world)]
        order = np.concatenate([s[np.argsort(lengths[s], kind="stable")] for s in shards])  # what evaluate gathers
        mine = order[slice(*shard_range(len(features), rank, world))]  # shards are contiguous: so is its part
        batches = eval_batches([features[i] for i in mine], self.cfg.batch_size * 2, self.tokenizer.pad_token_id or 0,
                               y[mine], self.packed)
        with torch.random.fork_rng(devices=[]):  # evaluation must not move the training RNG
            gathered = evaluate(self.model, self.accelerator, batches).rows["scores"]
        probs = np.empty_like(gathered)
        probs[order] = gathered
        return probs

    def score(self, probs: np.ndarray, data: Dataset, thresholds=None) -> dict:
        return score(probs, data, self.labels, self.cfg.multilabel, self.cfg.tolerant_k, thresholds, self.cfg.ordinal)

    def save(self, folder: Path, thresholds=None) -> None:
        save_classifier(self.hf(), self.tokenizer, folder, self.labels, self.cfg.multilabel, thresholds,
                        self.cfg.inference_settings())


def setup(cfg: FinetuneConfig, accelerator, tokenizer, labels: list[str], fit: Dataset, dev: Dataset,
          test: Dataset | None, seed: int, out: Path, make_model=Classifier, fit_targets: np.ndarray | None = None) -> Run:
    """The model (full or LoRA), batch sizes, optimizer, schedule and this process's training batches.
    `make_model(hf, multilabel)` and `fit_targets` (one row per row of `fit`) let another objective (distillation)
    train by the same recipe."""
    from accelerate.utils import set_seed

    set_seed(seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    with accelerator.main_process_first():  # a PaddleNLP folder is converted into --out once, by rank 0
        hf = load_classifier(cfg.model, labels, cfg.multilabel, cfg.method, cfg.lora_rank, cfg.lora_alpha, log=log,
                             work_dir=Path(cfg.out))
    if cfg.gradient_checkpointing:
        enable_checkpointing(hf)
    checks.tokenizer_fits(tokenizer, getattr(hf, "config", None), cfg.model)
    model = make_model(hf, cfg.multilabel)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.global_batch_size or cfg.batch_size * world
    if global_batch % (cfg.batch_size * world):
        raise DomainLMError(f"--global-batch-size {global_batch} is not a multiple of --batch-size {cfg.batch_size} "
                            f"x {world} processes")
    accumulation = global_batch // (cfg.batch_size * world)
    steps_per_epoch = batching.steps_per_epoch(len(fit), global_batch, world * accumulation)
    if steps_per_epoch == 0:
        raise DomainLMError(f"{len(fit)} training rows cannot fill {world * accumulation} micro batches of one step")
    max_steps = cfg.epochs * steps_per_epoch
    log(f"data: {len(fit)} training rows, {max_steps} steps; global batch {global_batch} = {cfg.batch_size} x "
        f"{accumulation} accumulation x {world} processes")
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                                cfg.adam_epsilon, cfg.layer_lr_decay)
    scheduler = build_scheduler(optimizer, max_steps, cfg.warmup_ratio, cfg.learning_rate,
                                cfg.learning_rate * cfg.min_lr_ratio, cfg.lr_decay)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    y = targets(fit, labels, cfg.multilabel) if fit_targets is None else fit_targets
    packed = cfg.unpad != "no" and packing_ready(hf) and (cfg.unpad == "yes" or accelerator.device.type == "cuda")
    batches = batching.train_batches(encode(tokenizer, fit, cfg.max_seq_len), y,
                                     global_batch, tokenizer.pad_token_id or 0, seed, rank, world, accumulation, packed)
    options = LoopOptions(max_steps=max_steps, accumulation=accumulation, global_batch_size=global_batch,
                          max_grad_norm=cfg.max_grad_norm, logging_freq=cfg.logging_freq,
                          eval_steps=cfg.eval_steps or steps_per_epoch, save_steps=cfg.save_steps)
    logger = RunLogger(out, max_steps, 0, accelerator.is_main_process, tensorboard=True)
    return Run(cfg, accelerator, tokenizer, labels, seed, out, fit, dev, test, model, optimizer, scheduler, batches,
               options, logger, EarlyStopping(cfg.best_metric, cfg.early_stopping_patience), packed)


def train(run: Run) -> TrainState:
    """Train with early stopping on dev; the best weights are restored at the end."""
    cfg, best = run.cfg, run.best

    def on_eval(step: int) -> bool:
        probs = run.scores(run.dev)
        m = run.score(probs, run.dev)
        run.logger.log(step, "valid", M.scalars(m))
        return best.update(m, step, run.accelerator.unwrap_model(run.model), probs)

    def on_snapshot(step: int) -> None:
        if run.main:
            run.save(run.out / f"step-{step:06d}")

    try:
        state = train_loop(model=run.model, optimizer=run.optimizer, scheduler=run.scheduler, accelerator=run.accelerator,
                           batches=run.batches, state=TrainState(), options=run.options, logger=run.logger,
                           on_eval=on_eval, on_snapshot=on_snapshot)
        if best.state is None:  # the loop evaluates after its last step; only a run of no steps has not
            on_eval(state.step)
    finally:
        run.logger.close()
    run.accelerator.unwrap_model(run.model).load_state_dict(best.state)
    if run.main:
        print(f"best {cfg.best_metric} {best.value:.4f} at step {best.step} (stopped at step {state.step} of "
              f"{run.options.max_steps})")
    return state


def finish(run: Run, state: TrainState) -> dict:
    """Thresholds tuned on dev (multi-label), metrics on dev and test, predictions, the model and its report."""
    cfg, probs = run.cfg, run.best.probs
    thresholds = M.tune_thresholds(probs, targets(run.dev, run.labels, True)) if cfg.multilabel else None
    result = {"seed": run.seed, "best_step": run.best.step, "steps": state.step, "train_rows": len(run.fit),
              "dev": run.score(probs, run.dev, thresholds)}
    if run.test is not None:
        test_probs = run.scores(run.test)
        result["test"] = run.score(test_probs, run.test, thresholds)
    if run.main:
        write_outputs(run.out, "dev", run.dev, probs, run.labels, cfg.multilabel, result["dev"], thresholds)
        if run.test is not None:
            write_outputs(run.out, "test", run.test, test_probs, run.labels, cfg.multilabel, result["test"], thresholds)
        run.save(run.out, thresholds)
        sections = {k: result[k] for k in ("dev", "test") if k in result}
        write_run(run.out, result, f"Fine-tuning {cfg.model}", sections, run.labels)
    run.accelerator.wait_for_everyone()
    run.accelerator.free_memory()  # the next seed or fold prepares a new model; let this one go
    return result


def finetune(cfg: FinetuneConfig) -> dict:
    """Each seed (or fold) is one run: setup, train, finish; then the floor beside them and the summary over runs."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected; domainlm reports what matters
    out = outputs.folder(cfg.out)
    outputs.claim(out)
    outputs.check_earlier_run(out, "finetune", outputs.FINETUNE_OUTPUTS, "train", cfg.overwrite,
                              inputs=(cfg.model, cfg.train, cfg.dev, cfg.test))
    cfg.precision = mixed_precision(cfg.precision)  # the config written into --out says what ran
    accelerator = make_accelerator(cfg.precision)
    task = Task.read(cfg)
    linear_only = cfg.method == "linear"
    tokenizer = None if linear_only else _tokenizer(cfg)
    main = accelerator.is_main_process
    if main:
        outputs.clear_known(out, outputs.FINETUNE_OUTPUTS, "finetune")  # an earlier run's files never mix with this one's
        out.mkdir(parents=True, exist_ok=True)
        cfglib.write(cfg, out)

    def run(rows: Dataset, test: Dataset | None, seed: int, folder: Path) -> dict:
        fit, dev = task.split(rows, cfg, seed)
        splits.append((fit, dev, test))
        if linear_only:
            return linear.run(cfg, fit, dev, test, task.labels, seed, folder) if main else {}
        one = setup(cfg, accelerator, tokenizer, task.labels, fit, dev, test, seed, folder)
        return finish(one, train(one))

    runs, splits = [], []
    if cfg.folds:
        held_out_rows = fold_indices(task.train, cfg.folds, cfg.seeds[0])
        for k, (fold_train, held_out) in enumerate(kfold(task.train, cfg.folds, cfg.seeds[0]), 1):
            runs.append(run(fold_train, held_out, cfg.seeds[0], out / f"fold-{k}"))
        evaluated = "test"  # each fold's held-out part
    else:
        for seed in cfg.seeds:
            runs.append(run(task.train, task.test, seed, out if len(cfg.seeds) == 1 else out / f"seed-{seed}"))
        evaluated = "test" if task.test is not None else "dev"
    if linear_only and not main:
        return {}
    summary = {"runs": len(runs), "evaluated_on": evaluated, "labels": task.labels, "skipped_rows": dict(task.train.skipped)}
    if cfg.floor and not linear_only and main:
        summary["floor"] = linear.floor_beside(cfg, splits, task.labels, evaluated, out, single=len(runs) == 1)
    if cfg.folds and main:
        summary.update(ensemble.cross_validation_outputs(cfg, task.train, held_out_rows, task.test, task.labels, out, load))
    if cfg.blend and main:
        summary["blend"] = blend.finetune_blend(cfg, out, load, task.labels, splits, task.train,
                                                held_out_rows if cfg.folds else None, task.test)
        print(blend.line(summary["blend"], cfg.best_metric))
        if not cfg.folds:  # one run: beside the floor in its metrics and report
            blend.add_to_run(out, summary["blend"], cfg.best_metric)
    if main:
        outputs.record(out, "finetune", outputs.FINETUNE_OUTPUTS)
    if len(runs) == 1:
        return {**summary, **runs[0]}
    summary["mean_std"] = M.aggregate([r[evaluated] for r in runs])
    summary["per_run"] = [{"seed": r["seed"], **M.scalars(r[evaluated])} for r in runs]
    if main:
        floor = linear.floor_line(summary["floor"], evaluated, cfg.best_metric) if "floor" in summary else None
        extra = ensemble.summary_lines(summary, cfg.best_metric) if "oof" in summary else []
        extra += ["", blend.line(summary["blend"], cfg.best_metric)] if "blend" in summary else []
        write_summary(out, summary, "folds" if cfg.folds else "seeds", floor, extra)
    return summary


def _tokenizer(cfg: FinetuneConfig):
    """The encoder's tokenizer, after checking --max-seq-len against the encoder's positions."""
    from domainlm.interop.tokenizer import load_fast_tokenizer
    from domainlm.pretrain.model import load_config

    tokenizer = load_fast_tokenizer(cfg.model, flag="--model")
    checks.max_seq_len(load_config(cfg.model), cfg.max_seq_len, cfg.model)
    return tokenizer


# ---- evaluate and predict ------------------------------------------------------------------------------

def evaluate_command(cfg: EvaluateConfig) -> dict:
    out = outputs.folder(cfg.out)
    if outputs.inside(out, cfg.model):
        raise DomainLMError(f"--out {out} lies inside --model {cfg.model}: choose a folder of its own")
    outputs.claim(out)
    outputs.check_earlier_run(out, "evaluate", outputs.EVALUATE_OUTPUTS, "data", inputs=(cfg.model, cfg.data))
    runtime = load(cfg.model, device=cfg.device, max_seq_len=cfg.max_seq_len)
    labels, multilabel = runtime.labels, runtime.multilabel
    columns = Columns.of(cfg, runtime)
    # the config written beside the results says what was used, the model's settings included
    cfg.text_column, cfg.pair_column = columns.text, columns.text_pair
    if runtime.tokenizer is not None:
        cfg.max_seq_len = runtime.max_seq_len
    data = read_examples(cfg.data, columns, multilabel, skip_bad=cfg.skip_bad_rows)
    unknown = sorted({label for ex in data.examples for label in ex.labels} - set(labels))
    if unknown:
        raise DomainLMError(f"{cfg.data}: labels {unknown} are not among the model's labels ({', '.join(labels)})")
    probs = runtime.predict(*data.columns(), cfg.batch_size, progress=True)
    thresholds = runtime.thresholds if multilabel else None
    metrics = score(probs, data, labels, multilabel, cfg.tolerant_k, thresholds, cfg.ordinal)
    outputs.clear_known(out, outputs.EVALUATE_OUTPUTS, "evaluate")
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out, "eval", data, probs, labels, multilabel, metrics, thresholds)
    write_run(out, metrics, f"Evaluation of {cfg.model} on {cfg.data}", {"eval": metrics}, labels)
    cfglib.write(cfg, out)
    outputs.record(out, "evaluate", outputs.EVALUATE_OUTPUTS)
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
