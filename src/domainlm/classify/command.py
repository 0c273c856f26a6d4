"""`domainlm finetune | evaluate | predict`.

finetune, as a recipe (each step a function below):
    check     classify.checks: the task's files, the model, its tokenizer, the batch arithmetic
    runs      one per seed (or fold): setup -> train (early stopping on dev) -> finish (predictions and the model
              written; metrics and probabilities kept in memory)
    beside    the classical floor on the same rows, the fold ensemble and its out-of-fold predictions, the blend: from
              the probabilities the runs kept, no model reloaded
    report    each run's metrics.json and report.md, written once, and the summary over runs
Everything is written through the run folder (outputs.run_folder): an earlier run is replaced only with
--overwrite, and kept whole when this one fails.
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
from domainlm.classify import batching, blend, ensemble, linear
from domainlm.classify import metrics as M
from domainlm.classify.batching import encode, eval_batches
from domainlm.classify.checks import check, few_valid_rows, unknown_tokens
from domainlm.classify.config import EvaluateConfig, FinetuneConfig, PredictConfig
from domainlm.classify.data import (
    Columns,
    Dataset,
    Task,
    check_predict_paths,
    fold_indices,
    keep_line_order,
    read_examples,
    read_stdin_lines,
    targets,
)
from domainlm.classify.metrics import best_k
from domainlm.classify.model import (
    Classifier,
    enable_checkpointing,
    inference_layers,
    load_classifier,
    packing_ready,
    save_classifier,
)
from domainlm.classify.report import score, write_outputs, write_run, write_summary
from domainlm.classify.results import HELD_OUT, TEST_FILE, Scored, fold_folder, seed_folder
from domainlm.classify.runtime import compute_dtype, open_runtime
from domainlm.classify.runtime_options import RuntimeOptions
from domainlm.errors import DomainLMError
from domainlm.options import divergence_causes
from domainlm.outputs import Writer
from domainlm.train.checkpoint import TrainState
from domainlm.train.logging import RunLogger
from domainlm.train.loop import LoopOptions, evaluate, shard_range, train_loop
from domainlm.train.setup import build_optimizer, build_scheduler, make_accelerator, mixed_precision

# what `domainlm finetune` writes into its --out (a file of the user's under one of these names is refused)
FINETUNE_OUTPUTS = (
    "config.yaml",
    "model",
    "adapter",
    "metrics.json",
    "report.md",
    "report.html",
    "log.jsonl",
    "tensorboard",
    "*_predictions.jsonl",
    "*_bad_cases.jsonl",
    "*_confusion.png",
    "curve_*.png",
    "step-*",
    "seed-*",
    "fold-*",
    "summary.json",
    "summary.md",
    "linear.npz",
    "linear.json",
    "floor",
    "converted-model",
    "oof.jsonl",
    "ensemble.json",
    "blend.json",
    "domainlm_labels.json",
)

# what `domainlm evaluate` writes into its --out (a file of the user's under one of these names is refused)
EVALUATE_OUTPUTS = (
    "config.yaml",
    "metrics.json",
    "report.md",
    "eval_predictions.jsonl",
    "eval_bad_cases.jsonl",
    "eval_confusion.png",
)


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
            raise DomainLMError(
                f"--metric {self.metric!r} is not computed; choose one of {', '.join(M.scalars(metrics))}"
            )
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
    folder: Writer  # this run's part of --out (the folder itself, seed-N or fold-K)
    fit: Dataset
    dev: Dataset
    evaluated: dict[str, Dataset]  # scored at the end: "test" (--test), or a fold's "held_out" rows and "test_file"
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
        batches = eval_batches(
            [features[i] for i in mine], self.cfg.batch_size * 2, self.tokenizer.pad_token_id or 0, y[mine], self.packed
        )
        classifier = self.accelerator.unwrap_model(self.model)
        with torch.random.fork_rng(devices=[]), inference_layers(classifier, self.inference_dtype()):
            # evaluation must not move the training RNG
            gathered = evaluate(self.model, self.accelerator, batches).rows["scores"]
        probs = np.empty_like(gathered)
        probs[order] = gathered
        return probs

    def inference_dtype(self) -> torch.dtype | None:
        """The dtype evaluations run the packed inference layers at (`inference_layers`): the run's precision on a
        CPU, unsharded, as the runtime computes it (`compute_dtype`); None elsewhere."""
        from accelerate.utils import DistributedType

        if self.accelerator.device.type != "cpu" or self.accelerator.distributed_type == DistributedType.FSDP:
            return None
        precision = str(self.accelerator.mixed_precision)
        return compute_dtype("fp32" if precision == "no" else precision)

    def score(self, probs: np.ndarray, data: Dataset, thresholds=None) -> dict:
        return score(probs, data, self.labels, self.cfg.multilabel, self.cfg.tolerant_k, thresholds, self.cfg.ordinal)

    def save(self, folder: Writer, thresholds=None) -> None:
        save_classifier(
            self.hf(),
            self.tokenizer,
            folder,
            self.labels,
            self.cfg.multilabel,
            thresholds,
            self.cfg.inference_settings(),
        )


def setup(
    cfg: FinetuneConfig,
    accelerator,
    tokenizer,
    labels: list[str],
    fit: Dataset,
    dev: Dataset,
    evaluated: dict[str, Dataset],
    seed: int,
    folder: Writer,
    make_model=Classifier,
    fit_targets: np.ndarray | None = None,
) -> Run:
    """The model (full or LoRA), batch sizes, optimizer, schedule and this process's training batches.
    `make_model(hf, multilabel)` and `fit_targets` (one row per row of `fit`) let another objective (distillation)
    train by the same recipe."""
    from accelerate.utils import set_seed

    set_seed(seed)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    with accelerator.main_process_first():  # a PaddleNLP folder is converted into --out once, by rank 0
        hf = load_classifier(
            cfg.model,
            labels,
            cfg.multilabel,
            cfg.method,
            cfg.lora_rank,
            cfg.lora_alpha,
            log=log,
            work_dir=Path(cfg.out),
        )
    if cfg.gradient_checkpointing:
        enable_checkpointing(hf)
    model = make_model(hf, cfg.multilabel)
    world, rank = accelerator.num_processes, accelerator.process_index
    accumulation = checks.accumulation(cfg.global_batch_size, cfg.batch_size, world)
    global_batch = accumulation * cfg.batch_size * world
    steps_per_epoch = batching.steps_per_epoch(len(fit), global_batch, world * accumulation)
    if steps_per_epoch == 0:
        raise DomainLMError(f"{len(fit)} training rows cannot fill {world * accumulation} micro batches of one step")
    max_steps = cfg.epochs * steps_per_epoch
    log(
        f"data: {len(fit)} training rows, {max_steps} steps; global batch {global_batch} = {cfg.batch_size} x "
        f"{accumulation} accumulation x {world} processes"
    )
    optimizer = build_optimizer(
        model,
        cfg.learning_rate,
        cfg.weight_decay,
        (cfg.adam_beta1, cfg.adam_beta2),
        cfg.adam_epsilon,
        cfg.layer_lr_decay,
    )
    scheduler = build_scheduler(
        optimizer, max_steps, cfg.warmup_ratio, cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, cfg.lr_decay
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    y = targets(fit, labels, cfg.multilabel) if fit_targets is None else fit_targets
    packed = cfg.unpad != "no" and packing_ready(hf)
    batches = batching.train_batches(
        encode(tokenizer, fit, cfg.max_seq_len),
        y,
        global_batch,
        tokenizer.pad_token_id or 0,
        seed,
        rank,
        world,
        accumulation,
        packed,
    )
    options = LoopOptions(
        max_steps=max_steps,
        accumulation=accumulation,
        global_batch_size=global_batch,
        max_grad_norm=cfg.max_grad_norm,
        logging_freq=cfg.logging_freq,
        eval_steps=cfg.eval_steps or steps_per_epoch,
        save_steps=cfg.save_steps,
        causes=divergence_causes(cfg),
    )
    folder.record("log.jsonl"), folder.record("tensorboard")
    logger = RunLogger(folder.root(), max_steps, 0, accelerator.is_main_process, tensorboard=True)
    return Run(
        cfg,
        accelerator,
        tokenizer,
        labels,
        seed,
        folder,
        fit,
        dev,
        evaluated,
        model,
        optimizer,
        scheduler,
        batches,
        options,
        logger,
        EarlyStopping(cfg.best_metric, cfg.early_stopping_patience),
        packed,
    )


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
            run.save(run.folder.sub(f"step-{step:06d}"))

    try:
        state = train_loop(
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            accelerator=run.accelerator,
            batches=run.batches,
            state=TrainState(),
            options=run.options,
            logger=run.logger,
            on_eval=on_eval,
            on_snapshot=on_snapshot,
        )
        if best.state is None:  # the loop evaluates after its last step; only a run of no steps has not
            on_eval(state.step)
    finally:
        run.logger.close()
    run.accelerator.unwrap_model(run.model).load_state_dict(best.state)
    if run.main:
        print(
            f"best {cfg.best_metric} {best.value:.4f} at step {best.step} (stopped at step {state.step} of "
            f"{run.options.max_steps})"
        )
    return state


def finish(run: Run, state: TrainState) -> Scored:
    """Thresholds tuned on dev (multi-label), every evaluated split scored, predictions and the model written; the
    metrics and probabilities are returned, not written (the report comes once every run is done)."""
    cfg, probs = run.cfg, run.best.probs
    thresholds = M.tune_thresholds(probs, targets(run.dev, run.labels, True)) if cfg.multilabel else None
    scored = Scored(
        {"seed": run.seed, "best_step": run.best.step, "steps": state.step, "train_rows": len(run.fit)},
        {"dev": probs},
        {"dev": run.dev},
        thresholds,
        run.fit,
        run.folder,
    )
    for name, data in run.evaluated.items():
        scored.probs[name], scored.rows[name] = run.scores(data), data
    for name, data in scored.rows.items():
        if name != TEST_FILE:  # a fold's --test rows count in the ensemble's figures only
            scored.metrics[name] = run.score(scored.probs[name], data, thresholds)
            if run.main:
                write_outputs(
                    run.folder,
                    name,
                    data,
                    scored.probs[name],
                    run.labels,
                    cfg.multilabel,
                    scored.metrics[name],
                    thresholds,
                )
    if run.main:
        run.save(run.folder, thresholds)
    run.accelerator.wait_for_everyone()
    return scored


def finetune(cfg: FinetuneConfig) -> dict:
    """check, then each seed (or fold) as one run, then the floor, the ensemble and the blend beside them from what
    the runs kept, then the reports."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected; domainlm reports what matters
    inputs = {"--train": cfg.train, "--dev": cfg.dev, "--test": cfg.test}
    with outputs.run_folder(
        cfg.out,
        "finetune",
        patterns=FINETUNE_OUTPUTS,
        overwrite=cfg.overwrite,
        inputs=inputs,
        models={"--model": cfg.model},
        legacy=outputs.config_with("train"),
    ) as out:
        found, errors = check(cfg)
        checks.first(errors)
        few_valid_rows(cfg, found.task)
        if found.tokenizer is not None:
            unknown_tokens(found.tokenizer, found.task.train.columns()[0])
        cfg.precision = mixed_precision(cfg.precision)  # the config written into --out says what ran
        accelerator = make_accelerator(cfg.precision)
        out.begin(cfg)
        runs, held_out = _runs(cfg, found, accelerator, out)
        if not accelerator.is_main_process:
            return {}
        return _report(cfg, found.task, runs, held_out, out)


def _runs(cfg: FinetuneConfig, found, accelerator, out: Writer) -> tuple[list[Scored], list[np.ndarray] | None]:
    """One run per seed, or per fold (each fold's held-out rows, and the --test rows, scored by its model)."""
    task: Task = found.task
    prepared = False  # a run before this one prepared a model and an optimizer with the accelerator

    def run(rows: Dataset, evaluated: dict[str, Dataset], seed: int, folder: Writer) -> Scored:
        nonlocal prepared
        fit, dev = task.split(rows, cfg, seed)
        if cfg.method == "linear":
            return (
                linear.run(cfg, fit, dev, evaluated, task.labels, seed, folder)
                if accelerator.is_main_process
                else Scored({})
            )
        if prepared:  # let the run before's model and optimizer go (a collection: 0.3 s, so only where one ran)
            accelerator.free_memory()
        prepared = True
        one = setup(cfg, accelerator, found.tokenizer, task.labels, fit, dev, evaluated, seed, folder)
        return finish(one, train(one))

    if cfg.folds:
        held_out = fold_indices(task.train, cfg.folds, cfg.seeds[0])
        runs = []
        for k, rows in enumerate(held_out, 1):
            keep = np.ones(len(task.train), dtype=bool)
            keep[rows] = False
            fit_rows = Dataset(task.train.path, [ex for ex, kept in zip(task.train.examples, keep) if kept])
            evaluated = {HELD_OUT: Dataset(task.train.path, [task.train.examples[i] for i in rows])}
            if task.test is not None:
                evaluated[TEST_FILE] = task.test
            runs.append(run(fit_rows, evaluated, cfg.seeds[0], out.sub(fold_folder(k))))
        return runs, held_out
    single = len(cfg.seeds) == 1
    evaluated = {"test": task.test} if task.test is not None else {}
    return [run(task.train, evaluated, seed, out if single else out.sub(seed_folder(seed))) for seed in cfg.seeds], None


def _report(cfg: FinetuneConfig, task: Task, runs: list[Scored], held_out, out: Writer) -> dict:
    """The floor, the fold ensemble and the blend beside the runs, then every report, each file written once."""
    metric = cfg.best_metric
    evaluated = HELD_OUT if cfg.folds else "test" if task.test is not None else "dev"
    summary = {
        "runs": len(runs),
        "evaluated_on": evaluated,
        "labels": task.labels,
        "skipped_rows": dict(task.train.skipped),
    }
    floor = linear.beside(cfg, runs, task.labels, evaluated, out) if cfg.floor and cfg.method != "linear" else None
    if floor is not None:
        summary["floor"] = floor["summary"]
    probs = None
    if cfg.folds:
        cv, probs = ensemble.cross_validation(cfg, task.train, held_out, runs, task.test, task.labels, out)
        summary.update(cv)
    if cfg.blend:
        summary["blend"] = blend.finetune_blend(
            cfg, task.labels, runs, floor["runs"], task.train, held_out, probs, task.test, out
        )
        print(blend.line(summary["blend"], metric))
    title = f"Fine-tuning {cfg.model}" if cfg.method != "linear" else "Linear floor"
    if len(runs) == 1:  # one run: the floor and the blend beside it in its own report
        result = {**runs[0].metrics, **{k: summary[k] for k in ("floor", "blend") if k in summary}}
        lines = (
            [linear.floor_line(summary["floor"], evaluated, metric, result.get(evaluated, {}).get(metric))]
            if "floor" in summary
            else []
        )
        lines += [blend.line(summary["blend"], metric)] if "blend" in summary else []
        write_run(out, result, title, sections(runs[0]), task.labels, lines)
        return {**summary, **runs[0].metrics}
    for run in runs:
        write_run(run.folder, run.metrics, title, sections(run), task.labels)
    summary["mean_std"] = M.aggregate([r.metrics[evaluated] for r in runs])
    summary["per_run"] = [{"seed": r.metrics["seed"], **M.scalars(r.metrics[evaluated])} for r in runs]
    floor_text = linear.floor_line(summary["floor"], evaluated, metric) if "floor" in summary else None
    extra = ensemble.summary_lines(summary, metric) if "oof" in summary else []
    extra += ["", blend.line(summary["blend"], metric)] if "blend" in summary else []
    write_summary(out, summary, "folds" if cfg.folds else "seeds", floor_text, extra)
    return summary


def sections(run: Scored) -> dict:
    return {k: run.metrics[k] for k in ("dev", "test", HELD_OUT) if k in run.metrics}


# ---- evaluate and predict ------------------------------------------------------------------------------


def evaluate_command(cfg: EvaluateConfig) -> dict:
    with outputs.run_folder(
        cfg.out,
        "evaluate",
        patterns=EVALUATE_OUTPUTS,
        overwrite=cfg.overwrite,
        inputs={"--data": cfg.data},
        models={"--model": cfg.model},
        legacy=outputs.config_with("data"),
    ) as out:
        runtime = open_runtime(cfg.model, RuntimeOptions.of(cfg))  # resolved once, here
        labels, multilabel = runtime.labels, runtime.multilabel
        columns = Columns.of(cfg, runtime)
        # the config written beside the results says what was used, the model's settings included
        cfg.text_column, cfg.pair_column = columns.text, columns.text_pair
        if runtime.tokenizer is not None:
            cfg.max_seq_len = runtime.max_seq_len
        data = read_examples(cfg.data, columns, multilabel, skip_bad=cfg.skip_bad_rows, flag="--data")
        unknown = sorted({label for ex in data.examples for label in ex.labels} - set(labels))
        if unknown:
            raise DomainLMError(f"{cfg.data}: labels {unknown} are not among the model's labels ({', '.join(labels)})")
        probs = runtime.predict(*data.columns(), cfg.batch_size, progress=True)
        thresholds = runtime.thresholds if multilabel else None
        metrics = score(probs, data, labels, multilabel, cfg.tolerant_k, thresholds, cfg.ordinal)
        out.begin(cfg)
        write_outputs(out, "eval", data, probs, labels, multilabel, metrics, thresholds)
        write_run(out, metrics, f"Evaluation of {cfg.model} on {cfg.data}", {"eval": metrics}, labels)
        return metrics


def predict_command(cfg: PredictConfig) -> int:
    from domainlm.classify.data import Example
    from domainlm.files import atomic_write

    check_predict_paths(cfg.input, cfg.out, cfg.overwrite)
    runtime = open_runtime(cfg.model, RuntimeOptions.of(cfg))  # resolved once, here
    if cfg.input == "-":
        data = Dataset(
            "<stdin>",
            [Example(text, [], line=i) for i, text in read_stdin_lines(getattr(sys.stdin, "buffer", sys.stdin))],
        )
    else:
        columns = Columns.of(cfg, runtime)
        data = read_examples(
            cfg.input, columns, runtime.multilabel, require_labels=False, skip_flag=None, flag="--input"
        )
    probs = runtime.predict(*data.columns(), cfg.batch_size, progress=True)
    labels = runtime.labels
    lines = [
        json.dumps(
            {
                "text": ex.text,
                "labels": [labels[j] for j in chosen],
                "scores": {labels[j]: round(float(p[j]), 4) for j in best},
            },
            ensure_ascii=False,
        )
        + "\n"
        for ex, p, chosen, best in zip(data.examples, probs, runtime.choose(probs), best_k(probs, cfg.top_k))
    ]
    text = "".join(keep_line_order(data, lines) if cfg.input == "-" else lines)
    if cfg.out == "-":
        sys.stdout.write(text)
    else:  # complete or absent: a failed run leaves no half file (and an earlier file whole)
        atomic_write(cfg.out, text, "--out")
    return len(data)
