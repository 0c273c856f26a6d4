"""What every training command sets up the same way: the accelerator, the optimizer and the schedule.

One accelerator setup for `pretrain` and `finetune`, so that both run alike under `torchrun` or
`accelerate launch` (data parallel on GPUs, gloo data parallel on CPUs, FSDP from `accelerate config`).
"""

from __future__ import annotations

import logging
import os
import re
import sys

import torch

from domainlm.errors import DomainLMError


def mixed_precision(choice: str) -> str:
    """The precision a training run uses (fp32, bf16 or fp16; see domainlm.precision for `auto`), said once at
    start by the main process."""
    from domainlm.precision import announce, resolve

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision, why = resolve(choice, device)
    announce(precision, why, main=int(os.environ.get("RANK", "0")) == 0)
    return precision


def make_accelerator(precision: str = "auto", find_unused_parameters: bool = False):
    """The one Accelerator of a run (`precision` as resolved by mixed_precision, or a choice to resolve).

    - Several processes without CUDA (`torchrun` on a CPU machine): Accelerate runs data parallel on gloo only
      when told `cpu=True`; otherwise each process would train alone and they would all write the same files.
    - `step_scheduler_with_optimizer=False`: a prepared scheduler otherwise steps once per *process* on every
      optimizer step (Accelerate assumes the per-process batch grew with the process count), which ends warmup
      and decay N times too early. Our schedules count optimizer steps, so the loop steps the scheduler exactly
      once after each optimizer step that was taken (see train_loop).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard load/save bars would drown the training log
    # save_state drops the aliases of tied and wrapped weights (the MLM decoder is the word embedding) and warns
    # about it at every checkpoint; loading restores them
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    from domainlm.precision import accelerate_name

    resolved = precision if precision in ("fp32", "bf16", "fp16") else mixed_precision(precision)
    _forget_other_precision(accelerate_name(resolved))
    accelerator = Accelerator(
        mixed_precision=accelerate_name(resolved), cpu=cpu, kwargs_handlers=[ddp], step_scheduler_with_optimizer=False
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.distributed_type != "FSDP":
        # Accelerate enables FSDP only on GPUs and other accelerators; on CPUs it quietly runs data parallel
        accelerator.print(
            f"warning: FSDP was asked for, but Accelerate runs {accelerator.distributed_type} on this machine "
            "(it shards only on GPUs and other accelerators)",
            file=sys.stderr,
        )
    return accelerator


def _forget_other_precision(name: str) -> None:
    """Accelerate keeps one precision per process; a second run in the same process (a sweep's cells, the demo's
    stages, a test) may use another. Its process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") not in (None, name):
        AcceleratorState._reset_state()


def layer_depths(model: torch.nn.Module) -> dict[str, int]:
    """Each trainable parameter's depth from the top, for layer-wise learning-rate decay: with L numbered encoder
    layers (`...layer.<i>.`), layer i is at depth L - i (the top layer at 1), the embeddings at L + 1, and
    everything else (a final norm, the pooler, the head) at 0."""
    index = {name: int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER.search(name))}
    if not index:
        raise DomainLMError("--layer-lr-decay: the model has no numbered encoder layers (`layer.<i>.`) to decay over")
    n_layers = max(index.values()) + 1
    return {
        name: n_layers - index[name] if name in index else n_layers + 1 if "embed" in name.lower() else 0
        for name, p in model.named_parameters()
        if p.requires_grad
    }


_LAYER = re.compile(r"\.layers?\.(\d+)\.")


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8, layer_decay: float = 1.0
):
    """AdamW; biases and LayerNorm weights get no weight decay. With layer_decay < 1 each parameter trains at
    lr x layer_decay^depth (layer_depths): the head at lr, lower layers ever slower. The fused kernel (CPU and
    CUDA) updates all parameters in one pass instead of a chain of per-tensor ops."""
    depths = layer_depths(model) if layer_decay != 1.0 else {}
    groups: dict[tuple[int, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name.lower()
        groups.setdefault((depths.get(name, 0), no_decay), []).append(p)
    # depth 0 first: the loop logs the first group's lr, the peak one
    params = [
        {"params": ps, "weight_decay": 0.0 if no_decay else weight_decay, "lr": lr * layer_decay**depth}
        for (depth, no_decay), ps in sorted(groups.items())
    ]
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, fused=True)


def warmup_steps(max_steps: int, warmup_ratio: float) -> int:
    return min(round(warmup_ratio * max_steps), max_steps - 1)


def build_scheduler(optimizer, max_steps: int, warmup_ratio: float, max_lr: float, min_lr: float, decay: str):
    """Warmup, peak, decay over optimizer steps 1..max_steps (transformers' warmup-stable-decay schedule with
    no stable phase):

    - steps 1..W (W = round(warmup_ratio x max_steps)) rise linearly from min_lr towards max_lr;
    - step W+1 trains at max_lr, once;
    - then linear or cosine decay that trains the last step at exactly min_lr.

    The optimizer starts at lr = max_lr, so the scheduler's factors are relative to it. The lr of step k is the
    one the optimizer holds before the k-th `optimizer.step()` (the loop logs that one).
    """
    from transformers import get_wsd_schedule

    warmup = warmup_steps(max_steps, warmup_ratio)
    decay_steps = max_steps - warmup - 1
    return get_wsd_schedule(
        optimizer,
        num_warmup_steps=warmup,
        # a run too short to decay trains its last step at the peak
        num_stable_steps=0 if decay_steps else 1,
        num_decay_steps=decay_steps,
        warmup_type="linear",
        decay_type=decay,
        min_lr_ratio=min_lr / max_lr if max_lr > 0 else 0.0,
    )
