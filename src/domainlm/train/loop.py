"""The one training loop and the one evaluator, shared by pretraining and fine-tuning.

The model is any nn.Module whose forward(**batch) returns (loss, metrics); objectives are loss functions in the
model, not callbacks here. Step order, visible below: accumulate micro batches (gradient sync only on the
last), clip, optimizer step, schedule step, log, evaluate, checkpoint, snapshot.

Equal across process counts: every micro batch's loss is weighted 1 / (micro batches per optimizer step, over
all processes), so 2 processes x 1 micro batch and 1 process x 2 micro batches of the same samples take the
same step (up to float reduction order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from domainlm.errors import DomainLMError
from domainlm.train.checkpoint import TrainState
from domainlm.train.setup import build_optimizer, build_scheduler, mixed_precision  # noqa: F401  (re-exported)


@dataclass
class LoopOptions:
    max_steps: int
    accumulation: int  # micro batches per optimizer step on each process
    global_batch_size: int
    max_grad_norm: float = 1.0
    logging_freq: int = 10
    eval_steps: int = 0  # and always after the last step
    checkpoint_steps: int = 0
    save_steps: int = 0
    causes: str = ""  # the options that usually make a loss non-finite, as the command's flags say them


class Finite:
    """Stops a run at its first non-finite loss or gradient norm, before anything is saved from it. The check
    stays on the device and is read where the loop waits for the device anyway (logging, evaluation, saving, the
    end); on a CPU, after every step."""

    def __init__(self, accelerator, options: LoopOptions):
        self.accelerator, self.options = accelerator, options
        device = accelerator.device
        self.every_step = device.type == "cpu"
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.last_good = torch.full((2,), float("nan"), dtype=torch.float64, device=device)  # (step, loss)

    def see(self, step: int, loss: torch.Tensor, grad_norm) -> None:
        good = torch.isfinite(loss.detach().float())
        if getattr(self.accelerator, "scaler", None) is None:  # fp16's loss scaler skips an overflowing step itself
            norm = grad_norm if isinstance(grad_norm, torch.Tensor) else torch.tensor(float(grad_norm or 0.0))
            good = good & torch.isfinite(norm.detach().float().to(loss.device))
        self.first_bad = torch.where(~good & (self.first_bad < 0), step, self.first_bad)
        here = torch.stack(
            [torch.tensor(float(step), dtype=torch.float64, device=loss.device), loss.detach().to(torch.float64)]
        )
        self.last_good = torch.where(good & (self.first_bad < 0), here, self.last_good)
        if self.every_step:
            self.check()

    def check(self) -> None:
        bad = self.first_bad
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(torch.where(bad < 0, torch.iinfo(torch.long).max, bad), reduction="min")
            bad = torch.where(bad == torch.iinfo(torch.long).max, -1, bad)
        step = int(bad)
        if step < 0:
            return
        last_step, last_loss = (float(x) for x in self.last_good.cpu())
        last = (
            f"the last finite loss was {last_loss:.4g} at step {int(last_step)}"
            if last_step == last_step
            else "no step had a finite loss"
        )
        causes = f"; what usually causes it: {self.options.causes}" if self.options.causes else ""
        raise DomainLMError(
            f"step {step}: the loss (or its gradient) is not a finite number; {last}{causes}. The run "
            "stopped there and saved nothing of it"
        )


def clip_gradients(accelerator, parameters: Iterable[torch.nn.Parameter], max_norm: float):
    """`accelerator.clip_grad_norm_`, one pass over the gradients cheaper on a CPU. torch scales every gradient by
    min(1, max_norm / norm) on every step, so as never to wait for a GPU to say the norm; a CPU says it at once, so
    there the gradients are scaled only on the steps whose norm is above max_norm (the same values: the other steps'
    factor is 1). Elsewhere, and with a loss scaler, FSDP or DeepSpeed, accelerate's own. Returns the norm."""
    from accelerate.utils import DistributedType

    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU)
    if (
        accelerator.device.type != "cpu"
        or not plain
        or getattr(accelerator, "scaler", None) is not None
        or not hasattr(torch.nn.utils, "get_total_norm")
    ):  # torch < 2.6
        return accelerator.clip_grad_norm_(parameters, max_norm)
    parameters = [p for p in parameters if p.grad is not None]  # a process's gradients are all-reduced already
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True)
    if float(norm) + 1e-6 > max_norm:  # torch's factor max_norm / (norm + 1e-6) is below 1 exactly then
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm, foreach=True)
    return norm


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous share [start, end) of n rows for one process; shares differ by at most one row, so that
    concatenating them in rank order gives every row exactly once, in order."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def to_device(batch: dict, device) -> dict:
    """Tensors to the device (asynchronously from pinned memory); host values (a packed batch's `max_len`) stay."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def real_tokens(batch: dict) -> torch.Tensor:
    """Tokens that are not padding: a padded batch's mask sum; every token of a packed stream."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel())


def ratios(values: dict[str, float]) -> dict[str, float]:
    """A metric given as a sum and a count (`name#sum`, `name#count`: a mean over the tokens or samples of one part of
    each batch, e.g. one corpus of several) becomes `name`, their ratio over everything averaged together; where
    the count is 0 (no such token in the window), it is left out."""
    for key in [k for k in values if k.endswith("#sum")]:
        name = key[: -len("#sum")]
        total, count = values.pop(key), values.pop(f"{name}#count", 0.0)
        if count:
            values[name] = total / count
    return values


@dataclass
class Evaluation:
    metrics: dict[str, float]  # mean over every evaluated micro batch of all processes
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # per-row outputs of all processes, in shard order


@torch.no_grad()
def evaluate(model, accelerator, batches: Iterable[dict], max_batches: int | None = None) -> Evaluation:
    """The evaluator of both commands. Scalar metrics are summed per micro batch and divided by the number of
    micro batches over all processes, which equals a one-process evaluation of the same micro batches. Metrics
    with a batch dimension (a classifier's scores) are per-row outputs: they are gathered exactly, each
    process's contiguous shard in rank order, with no row repeated or dropped."""
    from accelerate.utils import DistributedType

    batches = list(batches)[:max_batches]
    runs = len(batches)
    if accelerator.distributed_type == DistributedType.FSDP:
        # a sharded forward gathers parameters from every process: all run the same number of forwards, the
        # processes with fewer batches repeat one and drop its result
        runs = int(accelerator.reduce(torch.tensor(runs, device=accelerator.device), reduction="max"))
        if runs and not batches:
            raise DomainLMError(f"an evaluation set has fewer batches than the {accelerator.num_processes} processes")
        net = model
    else:  # the bare module: DDP's forward would broadcast buffers, a collective the processes need not share here
        net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {}
    for i in range(runs):
        batch = to_device(batches[min(i, len(batches) - 1)], accelerator.device)
        with accelerator.autocast():
            _, metrics = net(**batch)
        if i >= len(batches):
            continue
        for k, v in metrics.items():
            if v.ndim:
                rows.setdefault(k, []).append(v.detach().float().cpu())
            else:
                sums[k] = sums.get(k, 0) + v.detach().float()
    n = len(batches)
    net.train(was_training)
    local_rows = {k: torch.cat(v).numpy() for k, v in rows.items()}
    if accelerator.num_processes == 1:
        return Evaluation(ratios({k: float(v) / max(n, 1) for k, v in sums.items()}), local_rows)
    from accelerate.utils import gather_object

    # a process whose shard was empty knows no metric names: agree on them first
    names = sorted(set().union(*gather_object([sorted(sums)])))
    vector = torch.stack(
        [torch.as_tensor(sums.get(k, 0.0), dtype=torch.float32, device=accelerator.device) for k in names]
        + [torch.tensor(float(n), device=accelerator.device)]
    )
    total = accelerator.reduce(vector, reduction="sum").cpu()
    metrics = ratios({k: float(total[j]) / max(float(total[-1]), 1.0) for j, k in enumerate(names)})
    shards = gather_object([local_rows])
    keys = sorted({k for s in shards for k in s})
    return Evaluation(metrics, {k: np.concatenate([s[k] for s in shards if k in s]) for k in keys})


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
    finite = Finite(accelerator, options)
    window: dict[str, list[torch.Tensor]] = {}
    # token counts stay on the device: an int() per micro batch would wait for the GPU every time
    tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)
    window_started, paused = time.perf_counter(), 0.0
    while state.step < options.max_steps:
        # 1. forward/backward over this process's micro batches of one global batch
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(options.accumulation):
            batch = to_device(next(batches), accelerator.device)
            last = micro == options.accumulation - 1
            with nullcontext() if last else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss, metrics = model(**batch)
                accelerator.backward(loss / options.accumulation)
            step_loss = step_loss + loss.detach().float() / options.accumulation
            for k, v in metrics.items():
                window.setdefault(k, []).append(v.detach())
            tokens += real_tokens(batch)
        # 2. clip, step; the lr logged for this step is the one this step used
        lr = optimizer.param_groups[0]["lr"]
        grad_norm = clip_gradients(accelerator, model.parameters(), options.max_grad_norm)
        finite.see(state.step + 1, step_loss, grad_norm)
        optimizer.step()
        if not getattr(optimizer, "step_was_skipped", False):  # fp16 overflow: no step taken, schedule waits
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.consumed_samples += options.global_batch_size
        logger.advance()
        # 3. log, evaluate, save (time spent in callbacks is not training time)
        log_now = state.step % options.logging_freq == 0 or state.step == options.max_steps
        evaluate_now = state.step == options.max_steps or (options.eval_steps and state.step % options.eval_steps == 0)
        checkpoint_now = (
            on_checkpoint
            and options.checkpoint_steps
            and (state.step % options.checkpoint_steps == 0 or state.step == options.max_steps)
        )
        snapshot_now = on_snapshot and options.save_steps and state.step % options.save_steps == 0
        if log_now or evaluate_now or checkpoint_now or snapshot_now:
            finite.check()  # nothing is logged as good, evaluated or saved after a non-finite step
        if log_now:
            values = ratios(
                {
                    k: float(accelerator.reduce(torch.stack(v).float().mean(), reduction="mean"))
                    for k, v in window.items()
                }
            )
            values["lr"] = lr
            values["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
            total_tokens = int(accelerator.reduce(tokens, reduction="sum"))
            values["tokens"] = total_tokens  # the window's real tokens, all processes: rates over windows weigh by it
            values["tokens_per_s"] = total_tokens / max(time.perf_counter() - window_started - paused, 1e-9)
            logger.log(state.step, "train", values)
            window.clear()
            tokens.zero_()
            window_started, paused = time.perf_counter(), 0.0
        callbacks_started = time.perf_counter()
        # evaluate before the checkpoint of the same step, so that a run resumed from it has that evaluation
        stop = bool(on_eval and evaluate_now and on_eval(state.step))
        if checkpoint_now:
            on_checkpoint(state)
        if snapshot_now:
            on_snapshot(state.step)
        paused += time.perf_counter() - callbacks_started
        if stop:  # on_eval asked to stop early (no improvement for its patience)
            break
    finite.check()
    return state
