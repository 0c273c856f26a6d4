"""The shared loop's accounting: throughput counts training time only; the lr logged is the one used."""

import time

import torch

from domainlm.train.checkpoint import TrainState
from domainlm.train.loop import LoopOptions, evaluate, train_loop
from domainlm.train.setup import build_scheduler, make_accelerator


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(3, 1)

    def forward(self, x, attention_mask):
        loss = self.w(x).pow(2).mean()
        return loss, {"loss": loss.detach(), "scores": self.w(x).detach()[:, 0]} if not self.training else {
            "loss": loss.detach()
        }


class Log:
    def __init__(self):
        self.rows = []

    def log(self, step, split, values):
        self.rows.append((step, split, values))

    def advance(self, n=1):
        pass


def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        yield {"x": torch.randn(4, 3, generator=g), "attention_mask": torch.ones(4, 5, dtype=torch.long)}


def test_tokens_per_second_leaves_out_evaluation_and_the_lr_logged_is_the_one_used():
    accelerator = make_accelerator("fp32")
    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = build_scheduler(optimizer, 4, 0.5, 0.1, 0.01, "linear")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    log, pause = Log(), 0.25
    started = time.perf_counter()
    train_loop(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        accelerator=accelerator,
        batches=batches(),
        state=TrainState(),
        options=LoopOptions(max_steps=4, accumulation=2, global_batch_size=8, logging_freq=4, eval_steps=1),
        logger=log,
        on_eval=lambda step: time.sleep(pause),
    )
    wall = time.perf_counter() - started
    ((step, split, values),) = log.rows
    tokens = 4 * 2 * 4 * 5  # steps x micro batches x rows x tokens
    assert step == 4 and wall > 4 * pause and values["tokens"] == tokens
    assert values["tokens_per_s"] > tokens / (wall - 4 * pause) * 0.5  # counted over training time only
    assert values["tokens_per_s"] > 3 * tokens / wall
    assert values["lr"] == 0.01  # the last step trained at min_lr
    rows = evaluate(model, accelerator, [{"x": torch.ones(3, 3), "attention_mask": torch.ones(3, 2)}] * 2)
    assert rows.rows["scores"].shape == (6,) and model.training  # back to training mode after evaluating


def test_gradients_are_clipped_as_torch_clips_them_and_left_as_they_are_below_the_norm():
    """On a CPU the gradients are scaled only on steps whose norm is above the limit (one pass fewer); the
    values are torch's either way, and the norm returned is the norm before clipping."""
    from domainlm.train.loop import clip_gradients

    accelerator = make_accelerator("fp32")
    g = torch.Generator().manual_seed(1)
    for scale, max_norm in ((1e-3, 1.0), (10.0, 1.0), (10.0, float("inf"))):
        ours, theirs = ([torch.nn.Parameter(torch.zeros(s)) for s in ((7, 5), (5,), (300, 2))] for _ in range(2))
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g) * scale
            b.grad = a.grad.clone()
        before, copies = [a.grad for a in ours], [a.grad.clone() for a in ours]
        norm = clip_gradients(accelerator, ours, max_norm)
        want = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        assert torch.equal(norm, want)
        for a, b, grad, copy in zip(ours, theirs, before, copies):
            assert a.grad is grad and torch.equal(a.grad, b.grad)  # in place, and the same values
            assert torch.equal(a.grad, copy) == (float(norm) <= max_norm)  # scaled exactly where above the limit
