"""`domainlm pretrain`: continued (domain-adaptive) MLM + SOP pretraining on a corpus store.

setup(): corpus, split, sample index, model, tokenizer checks, optimizer, schedule, resume.
train(): the shared loop, with evaluation on a fixed validation set, checkpoints and step-N snapshots.
Runs the same under `torchrun` / `accelerate launch` (data parallel; FSDP and DeepSpeed via accelerate config).
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

from domainlm import config as cfglib
from domainlm.data.store import Corpus
from domainlm.data.tokenize import load_fast_tokenizer, vocab_hash
from domainlm.errors import DomainLMError
from domainlm.pretrain.config import PretrainConfig
from domainlm.pretrain.dataset import PretrainDataset, StepBatchSampler, collate
from domainlm.pretrain.masking import MaskingOptions, default_max_predictions
from domainlm.pretrain.model import PretrainingModel, load_config, load_pretraining_model
from domainlm.pretrain.samples import cached_samples, parse_split, split_corpus
from domainlm.train.checkpoint import (
    TrainState,
    load_checkpoint,
    model_fingerprint,
    resolve_resume,
    save_checkpoint,
    save_snapshot,
    step_name,
)
from domainlm.train.logging import RunLogger
from domainlm.train.loop import (
    LoopOptions,
    build_optimizer,
    build_scheduler,
    evaluate,
    mixed_precision,
    train_loop,
)


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "mask": tokenizer.mask_token_id,
           "pad": tokenizer.pad_token_id}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise DomainLMError(f"the tokenizer has no {', '.join(missing)} token; an encoder tokenizer is needed")
    return ids


def _load_tokenizer(cfg: PretrainConfig, corpus: Corpus):
    if cfg.tokenizer:
        return load_fast_tokenizer(cfg.tokenizer)
    model_dir = Path(cfg.model)
    if (model_dir / "tokenizer_config.json").is_file() or (model_dir / "tokenizer.json").is_file():
        return load_fast_tokenizer(cfg.model)
    return load_fast_tokenizer(str(corpus.path / "tokenizer"))


def pretrain(cfg: PretrainConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard load/save bars would drown the training log

    ddp = DistributedDataParallelKwargs(find_unused_parameters=not cfg.binary_head)  # pooler unused without SOP
    # Several processes without CUDA: Accelerate runs data parallel on CPU (gloo) only when told so.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.precision), kwargs_handlers=[ddp], cpu=cpu_ddp)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    out = Path(cfg.out)
    world = accelerator.num_processes

    # ---- setup: data ------------------------------------------------------------------------------------
    global_batch = cfg.global_batch_size or cfg.micro_batch_size * world
    if global_batch % (cfg.micro_batch_size * world):
        raise DomainLMError(
            f"--global-batch-size {global_batch} is not a multiple of --micro-batch-size {cfg.micro_batch_size} "
            f"x {world} processes"
        )
    accumulation = global_batch // (cfg.micro_batch_size * world)
    corpus = Corpus(cfg.corpus)
    tokenizer = _load_tokenizer(cfg, corpus)
    if vocab_hash(tokenizer) != corpus.meta.get("vocab_hash"):
        raise DomainLMError(
            f"{cfg.corpus} was tokenized with a different vocabulary ({corpus.meta.get('tokenizer')}) than the "
            "model's tokenizer; prepare the corpus with the model's tokenizer"
        )
    special = _special_ids(tokenizer)
    sop = cfg.binary_head
    max_tokens = cfg.max_seq_len - (3 if sop else 2)
    split = split_corpus(corpus, parse_split(cfg.split), cfg.seed, max_tokens, 2 if sop else 1)
    if split.message:
        log(f"split: {split.message}")
    samples, reports = {}, {}
    with accelerator.main_process_first():  # rank 0 builds and caches the index; the others read it
        for name, ranges in split.ranges.items():
            if len(ranges):
                samples[name], reports[name] = cached_samples(
                    corpus, name, ranges, max_tokens, cfg.short_seq_prob if name == "train" else 0.0, 2 if sop else 1, cfg.seed
                )
    if len(samples["train"]) < global_batch:
        raise DomainLMError(
            f"only {len(samples['train'])} training samples ({reports['train']['documents_unusable']} documents "
            f"have too few sentences{' for SOP' if sop else ''}); need at least one global batch of {global_batch}"
        )
    masking = MaskingOptions(
        masked_lm_prob=cfg.masked_lm_prob,
        max_predictions=cfg.max_predictions_per_seq or default_max_predictions(cfg.max_seq_len, cfg.masked_lm_prob),
        max_ngrams=cfg.max_ngrams, favor_longer_ngram=cfg.favor_longer_ngram, whole_word=cfg.whole_word_mask,
    )

    def dataset(name: str, shuffle: bool) -> PretrainDataset:
        return PretrainDataset(corpus, samples[name], name, cfg.max_seq_len, sop, masking, special, len(tokenizer), cfg.seed, shuffle)

    # ---- setup: model and optimizer -------------------------------------------------------------------
    checkpoints = out / "checkpoints"
    resume_from = resolve_resume(cfg.resume, checkpoints)
    if resume_from is None and cfg.resume is None and any(checkpoints.glob("step-*")):
        raise DomainLMError(f"{out} already holds checkpoints; pass --resume auto to continue, or choose another --out")
    set_seed(cfg.seed)
    if resume_from is not None:
        hf_model = load_pretraining_model(str(resume_from / "model"), from_scratch=False, log=log)
    else:
        hf_model = load_pretraining_model(cfg.model, cfg.from_scratch, log=log)
    limit = getattr(hf_model.config, "max_position_embeddings", None)
    if limit is not None and cfg.max_seq_len > limit:
        raise DomainLMError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's max_position_embeddings ({limit})")
    if hf_model.config.vocab_size < len(tokenizer):
        raise DomainLMError(
            f"the tokenizer has {len(tokenizer)} entries but the model's vocabulary only {hf_model.config.vocab_size}"
        )
    model = PretrainingModel(hf_model, sop)
    optimizer = build_optimizer(model, cfg.max_lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon)
    scheduler = build_scheduler(optimizer, cfg.max_steps, cfg.warmup_rate, cfg.max_lr, cfg.min_lr, cfg.lr_decay)
    state = TrainState(global_batch_size=global_batch, model_fingerprint=model_fingerprint(load_config(cfg.model)))
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, optimizer, scheduler, state)
        log(f"resumed from {resume_from} at step {state.step} ({state.consumed_samples} samples consumed)")
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfglib.write(cfg, out)
        (out / "data.json").write_text(json.dumps({"splits": split.summary(), "samples": reports,
                                                    "accumulation": accumulation, "processes": world}, indent=2))
    log(f"data: {json.dumps(reports['train'])}; global batch {global_batch} = {cfg.micro_batch_size} x {accumulation} "
        f"accumulation x {world} processes")

    # ---- train -------------------------------------------------------------------------------------------
    loader = torch.utils.data.DataLoader(
        dataset("train", shuffle=True),
        batch_sampler=StepBatchSampler(state.consumed_samples, global_batch, cfg.micro_batch_size, accelerator.process_index, world),
        collate_fn=partial(collate, pad_id=special["pad"]),
        num_workers=cfg.num_workers, persistent_workers=False,
        generator=torch.Generator(),  # its own seed stream: creating the iterator must not draw from the global RNG
    )

    def eval_loader(name: str):
        ds = dataset(name, shuffle=False)
        sampler = torch.utils.data.distributed.DistributedSampler(ds, world, accelerator.process_index, shuffle=False) if world > 1 else None
        return torch.utils.data.DataLoader(ds, batch_size=cfg.micro_batch_size, sampler=sampler,
                                           collate_fn=partial(collate, pad_id=special["pad"]))

    logger = RunLogger(out, cfg.max_steps, state.step, accelerator.is_main_process, cfg.tensorboard)
    unwrapped = lambda: accelerator.unwrap_model(model).hf  # noqa: E731

    last_valid: dict[int, dict] = {}

    def on_eval(step: int) -> None:
        if "valid" in samples:
            # eval must not consume the global RNG, or a resumed run would diverge from an uninterrupted one
            with torch.random.fork_rng(devices=[]):
                last_valid[step] = evaluate(model, accelerator, eval_loader("valid"), cfg.eval_iters)
            logger.log(step, "valid", last_valid[step])

    def on_checkpoint(st: TrainState) -> None:
        save_checkpoint(accelerator, checkpoints, unwrapped(), optimizer, scheduler, st, cfg.keep_last)

    def on_snapshot(step: int) -> None:
        if accelerator.is_main_process:
            save_snapshot(out / step_name(step), unwrapped(), tokenizer)
        accelerator.wait_for_everyone()

    options = LoopOptions(
        max_steps=cfg.max_steps, accumulation=accumulation, global_batch_size=global_batch, max_grad_norm=cfg.max_grad_norm,
        logging_freq=cfg.logging_freq, eval_freq=cfg.eval_freq, checkpoint_steps=cfg.checkpoint_steps or cfg.max_steps,
        save_steps=cfg.save_steps,
    )
    try:
        state = train_loop(model=model, optimizer=optimizer, scheduler=scheduler, accelerator=accelerator,
                           batches=iter(loader), state=state, options=options, logger=logger, on_eval=on_eval,
                           on_checkpoint=on_checkpoint, on_snapshot=on_snapshot)
        results = {}
        with torch.random.fork_rng(devices=[]):
            for name in ("valid", "test"):
                if name == "valid" and state.step in last_valid and cfg.eval_iters * cfg.micro_batch_size >= len(samples["valid"]):
                    results[name] = last_valid[state.step]  # the periodic evaluation at this step saw the whole set
                elif name in samples:
                    results[name] = evaluate(model, accelerator, eval_loader(name))
                    logger.log(state.step, name, results[name])
    finally:
        logger.close()
    if accelerator.is_main_process:
        save_snapshot(out / "final", unwrapped(), tokenizer)
        (out / "results.json").write_text(json.dumps({"step": state.step, **results}, indent=2))
        log(f"done: {out / 'final'} ({json.dumps(results)})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    sys.stdout.flush()
    return results
