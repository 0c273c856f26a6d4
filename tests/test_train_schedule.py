"""The learning-rate schedule: exact values per optimizer step, and resuming it mid-way."""

import io
import math

import pytest
import torch

from domainlm.train.setup import build_scheduler


def lrs(max_steps, warmup_rate, decay, max_lr=1.0, min_lr=0.1, start=None, stop=None):
    """The lr each optimizer step 1..max_steps trains with (what the loop logs)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=max_lr)
    sched = build_scheduler(opt, max_steps, warmup_rate, max_lr, min_lr, decay)
    out = []
    for _ in range(max_steps if stop is None else stop):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out, opt, sched


def test_linear_warmup_peak_once_decay_to_min_on_the_last_step():
    got, _, _ = lrs(10, 0.2, "linear")  # W = 2 warmup steps, peak at step 3, 7 decay steps to min at step 10
    want = [0.1, 0.55, 1.0] + [0.1 + 0.9 * (1 - j / 7) for j in range(1, 8)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got.count(max(got)) == 1 and got[-1] == pytest.approx(0.1, abs=1e-15)
    # linear: equal decrements after the peak
    steps = [a - b for a, b in zip(got[2:], got[3:])]
    assert max(steps) - min(steps) < 1e-12


def test_cosine_shape_and_no_warmup():
    got, _, _ = lrs(9, 0.0, "cosine", max_lr=2e-3, min_lr=2e-4)
    want = [2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * j / 8)) for j in range(9)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] == pytest.approx(2e-3) and got[-1] == pytest.approx(2e-4, rel=1e-12)
    assert got[4] == pytest.approx(1.1e-3, rel=1e-12)  # the midpoint of a cosine is the mean of peak and floor


def test_short_runs_and_zero_floor():
    assert lrs(1, 0.5, "linear")[0] == [1.0]  # one step: the peak
    assert lrs(2, 0.0, "cosine", min_lr=0.0)[0] == pytest.approx([1.0, 0.0])
    got, _, _ = lrs(5, 0.4, "linear", min_lr=0.0)
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])


def test_resume_mid_schedule_equals_uninterrupted():
    full, _, _ = lrs(20, 0.1, "cosine")
    head, opt, sched = lrs(20, 0.1, "cosine", stop=7)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain numbers: no pickled objects needed
    p = torch.nn.Parameter(torch.zeros(1))
    opt2 = torch.optim.SGD([p], lr=1.0)
    sched2 = build_scheduler(opt2, 20, 0.1, 1.0, 0.1, "cosine")
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    tail = []
    for _ in range(13):
        tail.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert head + tail == full
