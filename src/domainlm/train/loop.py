"""The one training loop, shared by pretraining and fine-tuning.

The model is any nn.Module whose forward(**batch) returns (loss, metrics); objectives are loss functions in the
model, not callbacks here. Step order, visible below: accumulate micro batches (gradient sync only on the
last), clip, optimizer step, schedule step, log, evaluate, checkpoint, snapshot.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from domainlm.train.checkpoint import TrainState


@dataclass
class LoopOptions:
    max_steps: int
    accumulation: int  # micro batches per optimizer step on each process
    global_batch_size: int
    max_grad_norm: float = 1.0
    logging_freq: int = 10
    eval_freq: int = 0
    checkpoint_steps: int = 0
    save_steps: int = 0


def mixed_precision(choice: str) -> str:
    """`auto`: bf16 on a GPU that has it, else full precision (CPU autocast is slower on most CPUs)."""
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
    """AdamW; biases and LayerNorm weights get no weight decay. The fused kernel (CPU and CUDA) updates all
    parameters in one pass instead of a chain of per-tensor ops."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def build_scheduler(optimizer, max_steps: int, warmup_rate: float, max_lr: float, min_lr: float, decay: str):
    """Linear warmup to max_lr, then linear or cosine decay to min_lr at max_steps."""
    warmup = round(warmup_rate * max_steps)
    floor = min_lr / max_lr if max_lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model, accelerator, batches, max_batches: int | None = None) -> dict[str, float]:
    """Mean of each metric over the batches, averaged across processes."""
    was_training = model.training
    model.eval()
    sums: dict[str, list[torch.Tensor]] = defaultdict(list)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            _, metrics = model(**batch)
        for k, v in metrics.items():
            sums[k].append(v.detach().float())
    model.train(was_training)
    result = {}
    for k, values in sums.items():
        result[k] = float(accelerator.reduce(torch.stack(values).mean(), reduction="mean"))
    return result


def train_loop(
    *,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    accelerator,
    batches: Iterator[dict],
    state: TrainState,
    options: LoopOptions,
    logger,
    on_eval: Callable[[int], bool | None] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    on_snapshot: Callable[[int], None] | None = None,
) -> TrainState:
    model.train()
    window: dict[str, list[torch.Tensor]] = defaultdict(list)
    tokens, window_started = 0, time.perf_counter()
    while state.step < options.max_steps:
        # 1. forward/backward over the micro batches of one global batch
        for micro in range(options.accumulation):
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
            last = micro == options.accumulation - 1
            with nullcontext() if last else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss, metrics = model(**batch)
                accelerator.backward(loss / options.accumulation)
            for k, v in metrics.items():
                window[k].append(v.detach())
            tokens += int(batch["attention_mask"].sum())
        # 2. clip, step, schedule
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), options.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.consumed_samples += options.global_batch_size
        logger.advance()
        # 3. log, evaluate, save
        if state.step % options.logging_freq == 0 or state.step == options.max_steps:
            seconds = time.perf_counter() - window_started
            values = {k: float(accelerator.reduce(torch.stack(v).float().mean(), reduction="mean")) for k, v in window.items()}
            values["lr"] = scheduler.get_last_lr()[0]
            values["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
            values["tokens_per_s"] = tokens * accelerator.num_processes / max(seconds, 1e-9)
            logger.log(state.step, "train", values)
            window.clear()
            tokens, window_started = 0, time.perf_counter()
        stop = bool(on_eval and options.eval_freq and state.step % options.eval_freq == 0 and on_eval(state.step))
        if on_checkpoint and options.checkpoint_steps and (
            state.step % options.checkpoint_steps == 0 or state.step == options.max_steps
        ):
            on_checkpoint(state)
        if on_snapshot and options.save_steps and state.step % options.save_steps == 0:
            on_snapshot(state.step)
        if stop:  # on_eval asked to stop early (no improvement for its patience)
            break
    return state
