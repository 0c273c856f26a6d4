"""`domainlm pretrain`: continued (domain-adaptive) MLM + SOP pretraining on a corpus store.

Read like a recipe, top to bottom:
    setup()  the accelerator, data (split, sample index, loaders), model, optimizer, schedule, resume
    train()  the shared loop, evaluating a fixed number of batches of the fixed validation samples,
             checkpoints (Accelerate state API) and step-N snapshots
    finish() test evaluation, the final model (full HF weights), results.json
Runs the same under `torchrun` / `accelerate launch`: data parallel (gloo on CPU, NCCL on GPU) or FSDP from
`accelerate config`. A global batch holds the same samples whatever the number of processes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from domainlm import checks, outputs
from domainlm.data.store import Corpus
from domainlm.encoder.packed import supports_packing
from domainlm.errors import DomainLMError
from domainlm.interop.models import load_weights
from domainlm.options import divergence_causes
from domainlm.outputs import RunFolder
from domainlm.pretrain import mixture
from domainlm.pretrain.config import PretrainConfig
from domainlm.pretrain.dataset import PretrainDataset, StepBatchSampler, collate, collate_packed
from domainlm.pretrain.masking import MaskingOptions, default_max_predictions
from domainlm.pretrain.model import PretrainingModel
from domainlm.pretrain.samples import cached_samples, parse_split, split_corpus
from domainlm.train.checkpoint import (
    TrainState,
    check_shared,
    load_checkpoint,
    model_fingerprint,
    resolve_resume,
    save_checkpoint,
    save_snapshot,
    step_name,
)
from domainlm.train.logging import RunLogger
from domainlm.train.loop import LoopOptions, evaluate, train_loop
from domainlm.train.setup import build_optimizer, build_scheduler, make_accelerator, mixed_precision

# what `domainlm pretrain` writes into its --out (a file of the user's under one of these names is refused)
PRETRAIN_OUTPUTS = (
    "config.yaml",
    "data.json",
    "results.json",
    "log.jsonl",
    "tensorboard",
    "step-*",
    "final",
    "converted-model",
    "checkpoints",
)


def eval_batch_indices(
    n: int, global_batch: int, micro_batch: int, rank: int, world: int, iters: int
) -> list[list[int]]:
    """This process's micro batches of the first `iters` global batches of an evaluation split (samples
    0..n-1, the last global batch cut at n). Rank r takes its contiguous share of each global batch, like
    training, so every process count evaluates the same micro batches."""
    per_rank, out = global_batch // world, []
    for start in range(0, min(n, iters * global_batch), global_batch):
        mine = start + rank * per_rank
        for m in range(mine, mine + per_rank, micro_batch):
            batch = list(range(m, min(m + micro_batch, mine + per_rank, n)))
            if batch:
                out.append(batch)
    return out


def loader_workers(asked: int | None, accelerator) -> int:
    """--num-workers, or by default 1 on a CPU (the cores train) and on a GPU enough to keep it fed (one worker masks
    about 600-800 samples/s; a GPU trains several thousand of 256 tokens per second), leaving each process a core."""
    if asked is not None:
        return asked
    if accelerator.device.type != "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cores // accelerator.num_processes - 1))


@dataclass
class Run:
    """Everything setup() builds and train()/finish() use."""

    cfg: PretrainConfig
    accelerator: object
    out: RunFolder
    tokenizer: object
    datasets: dict[str, PretrainDataset]
    train_loader: torch.utils.data.DataLoader
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: TrainState
    options: LoopOptions
    collate: Callable[[list[dict]], dict]  # packed streams, or padded batches for models without packing
    logger: RunLogger
    last_valid: dict[int, dict] = field(default_factory=dict)  # step -> validation metrics
    mixture: mixture.Mixture | None = None  # several corpora, drawn by weight

    def log(self, *args) -> None:
        if self.accelerator.is_main_process:
            print(*args, flush=True)

    def evaluate(self, split: str, iters: int) -> dict[str, float]:
        a, ds = self.accelerator, self.datasets[split]
        batches = eval_batch_indices(
            len(ds), self.options.global_batch_size, self.cfg.batch_size, a.process_index, a.num_processes, iters
        )
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=self.collate)
        # evaluation must not draw from the global RNG, or a resumed run would diverge from an uninterrupted one
        with torch.random.fork_rng(devices=[]):
            return evaluate(self.model, a, loader).metrics

    def snapshot(self, name: str) -> None:
        folder = self.out.record(name)  # in the manifest before it is written
        with self.out.writing(name):
            save_snapshot(self.accelerator, folder, self.model, lambda m: m.hf, self.tokenizer)


def pretrain(cfg: PretrainConfig) -> dict:
    """setup, train, finish, inside the run folder: a second run on this --out stops at once; an earlier one is
    continued (--resume) or replaced (--overwrite), never silently."""
    if cfg.resume and cfg.overwrite:
        raise DomainLMError("--resume and --overwrite both given: continue the earlier run, or replace it, not both")
    models = {"--model": cfg.model, "--tokenizer": cfg.tokenizer}
    with outputs.run_folder(
        cfg.out,
        "pretrain",
        patterns=PRETRAIN_OUTPUTS,
        overwrite=cfg.overwrite,
        resume=cfg.resume is not None,
        inputs=mixture.inputs(cfg.corpus),
        models=models,
        legacy=outputs.config_with("corpus"),
    ) as out:
        run = setup(cfg, out)
        try:
            state = train(run)
            return finish(run, state)
        finally:
            run.logger.close()


def setup(cfg: PretrainConfig, out: RunFolder) -> Run:
    from transformers import AutoModelForPreTraining

    from domainlm.pretrain.checks import check

    found, errors = check(cfg)
    checks.first(errors)
    checkpoints = out.out / "checkpoints"
    main = int(os.environ.get("RANK", "0")) == 0
    resume_from = resolve_resume(cfg.resume, checkpoints, quiet=not main)  # one warning
    if cfg.resume and resume_from is None and out.earlier == "finished":
        out.refuse_earlier("and no checkpoint to resume from")
    cfg.precision = mixed_precision(cfg.precision)
    accelerator = make_accelerator(
        cfg.precision, find_unused_parameters=not cfg.binary_head
    )  # pooler unused without SOP
    world = accelerator.num_processes
    accumulation = checks.accumulation(cfg.global_batch_size, cfg.batch_size, world)
    global_batch = accumulation * cfg.batch_size * world
    corpus, tokenizer, special = found.corpus, found.tokenizer, found.special
    mix = None
    if mixture.several(cfg.corpus):  # each corpus split and indexed as one alone, then blended (pretrain/mixture.py)
        mix = mixture.build(cfg, found.corpora, lambda c: _datasets(cfg, accelerator, c, tokenizer, special, 1))
        datasets, data, train_report = mix.datasets(), mix.data_report(), mix.train_report()
    else:
        datasets, reports, split = _datasets(cfg, accelerator, corpus, tokenizer, special, global_batch)
        data = {
            "splits": {k: v.pop("documents") for k, v in reports.items()},
            "split": split.summary(),
            "samples": reports,
        }
        train_report = reports["train"]
    out.begin(cfg)
    check_shared(accelerator, out.out)  # checkpoints: written by rank 0, read by every rank

    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    with accelerator.main_process_first():  # a PaddleNLP folder is converted into --out once, by rank 0
        hf_model = load_weights(
            cfg.model, AutoModelForPreTraining, from_scratch=cfg.from_scratch, log=log, work_dir=out
        )
    packed = cfg.unpad and supports_packing(hf_model.base_model)
    if cfg.unpad and not packed:
        log(f"model: {type(hf_model).__name__} blocks are not ones the packed encoder runs; the padded forward runs")
    model = PretrainingModel(hf_model, cfg.binary_head, mix and mix.names)
    if cfg.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(
        model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon
    )
    scheduler = build_scheduler(optimizer, cfg.max_steps, cfg.warmup_ratio, cfg.learning_rate, cfg.min_lr, cfg.lr_decay)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState(global_batch_size=global_batch, model_fingerprint=model_fingerprint(found.config))
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, state)
        log(f"resumed from {resume_from} at step {state.step} ({state.consumed_samples} samples consumed)")

    out.write_json("data.json", {**data, "accumulation": accumulation, "processes": world})
    log(
        f"data: {json.dumps(train_report)}; global batch {global_batch} = {cfg.batch_size} x {accumulation} "
        f"accumulation x {world} processes"
    )
    collate_fn = collate_packed if packed else partial(collate, pad_id=special["pad"])
    train_loader = torch.utils.data.DataLoader(
        datasets["train"],
        batch_sampler=StepBatchSampler(
            state.consumed_samples, global_batch, cfg.batch_size, accelerator.process_index, world
        ),
        collate_fn=collate_fn,
        num_workers=loader_workers(cfg.num_workers, accelerator),
        persistent_workers=False,
        pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator(),  # its own seed stream: creating the iterator must not draw from the global RNG
    )
    options = LoopOptions(
        max_steps=cfg.max_steps,
        accumulation=accumulation,
        global_batch_size=global_batch,
        max_grad_norm=cfg.max_grad_norm,
        logging_freq=cfg.logging_freq,
        eval_steps=cfg.eval_steps,
        checkpoint_steps=cfg.checkpoint_steps or cfg.max_steps,
        save_steps=cfg.save_steps,
        causes=divergence_causes(cfg),
    )
    out.record("log.jsonl"), out.record("tensorboard"), out.record("checkpoints")
    logger = RunLogger(out.root(), cfg.max_steps, state.step, accelerator.is_main_process, cfg.tensorboard)
    return Run(
        cfg,
        accelerator,
        out,
        tokenizer,
        datasets,
        train_loader,
        model,
        optimizer,
        scheduler,
        state,
        options,
        collate_fn,
        logger,
        mixture=mix,
    )


def _datasets(cfg: PretrainConfig, accelerator, corpus: Corpus, tokenizer, special: dict, global_batch: int):
    """Split (by documents, or by sentence blocks when they are too few), the sample index of each split
    (built once, cached, memory-mapped), and the datasets."""
    sop = cfg.binary_head
    max_tokens = cfg.max_seq_len - (3 if sop else 2)
    split = split_corpus(corpus, parse_split(cfg.split), cfg.seed, max_tokens, 2 if sop else 1)
    if split.message and accelerator.is_main_process:
        print(f"split: {split.message}")
    samples, reports = {}, {}
    with accelerator.main_process_first():  # rank 0 builds and caches the index; the others read it
        for name, ranges in split.ranges.items():
            if len(ranges):
                samples[name], reports[name] = cached_samples(
                    corpus,
                    name,
                    ranges,
                    max_tokens,
                    cfg.short_seq_prob if name == "train" else 0.0,
                    2 if sop else 1,
                    cfg.seed,
                )
                reports[name]["documents"] = int(len(ranges))
    if len(samples["train"]) < global_batch:
        raise DomainLMError(
            f"only {len(samples['train'])} training samples ({reports['train']['documents_unusable']} documents "
            f"have too few sentences{' for SOP' if sop else ''}); need at least one global batch of {global_batch}"
        )
    masking = MaskingOptions(
        masked_lm_prob=cfg.masked_lm_prob,
        max_predictions=cfg.max_predictions_per_seq or default_max_predictions(cfg.max_seq_len, cfg.masked_lm_prob),
        max_ngrams=cfg.max_ngrams,
        favor_longer_ngram=cfg.favor_longer_ngram,
        whole_word=cfg.whole_word_mask,
    )
    datasets = {
        name: PretrainDataset(
            corpus, s, name, cfg.max_seq_len, sop, masking, special, len(tokenizer), cfg.seed, shuffle=name == "train"
        )
        for name, s in samples.items()
        if len(s)
    }
    empty = [name for name, s in samples.items() if not len(s)]
    if empty and accelerator.is_main_process:
        held = " and ".join(f"the {n} split ({reports[n]['documents']} documents)" for n in empty)
        print(
            f"warning: {held} holds 0 samples{' (too few sentences for SOP)' if sop else ''}: no "
            f"{' or '.join(empty)} loss is reported; raise its share in --split",
            file=sys.stderr,
        )
    return datasets, reports, split


def train(run: Run) -> TrainState:
    cfg, out = run.cfg, run.out.root()

    def on_eval(step: int) -> None:
        if "valid" in run.datasets:
            run.last_valid[step] = run.evaluate("valid", cfg.eval_iters)
            run.logger.log(step, "valid", run.last_valid[step])

    def on_checkpoint(state: TrainState) -> None:
        save_checkpoint(run.accelerator, out / "checkpoints", state, cfg.keep_last)

    state = train_loop(
        model=run.model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        accelerator=run.accelerator,
        batches=iter(run.train_loader),
        state=run.state,
        options=run.options,
        logger=run.logger,
        on_eval=on_eval,
        on_checkpoint=on_checkpoint,
        on_snapshot=lambda step: run.snapshot(step_name(step)),
    )
    return state


def finish(run: Run, state: TrainState) -> dict:
    results = {}
    if "valid" in run.datasets:  # evaluated after the last step, unless this run resumed from that step's checkpoint
        results["valid"] = run.last_valid.get(state.step) or run.evaluate("valid", run.cfg.eval_iters)
    if "test" in run.datasets:
        results["test"] = run.evaluate("test", run.cfg.test_iters)
        run.logger.log(state.step, "test", results["test"])
    run.snapshot("final")
    drawn = {"corpora": run.mixture.seen(state.consumed_samples)} if run.mixture else {}  # samples, tokens per corpus
    run.out.write_json("results.json", {"step": state.step, **results, **drawn})
    run.log(f"done: {run.out.root() / 'final'} ({json.dumps(results)})")
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    sys.stdout.flush()
    return results
