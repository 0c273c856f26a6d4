"""2 processes (torchrun, gloo on CPU) equal 1 process with gradient accumulation, for pretrain and finetune.

The model has no dropout: with dropout, each process draws its own masks, which is right but not comparable
step by step with one process.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from domainlm.cli import main
from domainlm.pretrain.dataset import StepBatchSampler
from domainlm.train.logging import read_log
from domainlm.train.loop import shard_range
from tests.test_classify import make_rows, write_jsonl

METRICS = ("loss", "mlm_loss", "sop_loss", "mlm_acc", "sop_acc", "acc", "accuracy", "f1_macro", "grad_norm")


@pytest.fixture(scope="module")
def still_model(tmp_path_factory, tiny_model):
    """The tiny model with dropout off."""
    out = tmp_path_factory.mktemp("still")
    shutil.copytree(tiny_model, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def torchrun(*args):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",  # a free port
        "-m",
        "domainlm.cli",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def assert_same_logs(one, two):
    a, b = read_log(one / "log.jsonl"), read_log(two / "log.jsonl")
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]  # rank 0 alone logged
    for ra, rb in zip(a, b):
        if "lr" in ra:
            assert ra["lr"] == rb["lr"], (ra, rb)
        for k in METRICS:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (k, ra, rb)
    return a


def test_process_shares_of_a_global_batch_are_the_one_process_micro_batches():
    one = iter(StepBatchSampler(8, 16, 4, rank=0, world_size=1))
    ranks = [iter(StepBatchSampler(8, 16, 4, rank=r, world_size=2)) for r in (0, 1)]
    for _ in range(3):  # three optimizer steps
        single = [next(one) for _ in range(4)]
        assert [next(ranks[0]) for _ in range(2)] + [next(ranks[1]) for _ in range(2)] == single
    assert [shard_range(7, r, 2) for r in (0, 1)] == [(0, 4), (4, 7)]
    assert [shard_range(2, r, 3) for r in (0, 1, 2)] == [(0, 1), (1, 2), (2, 2)]


def test_pretrain_two_processes_equal_one_with_accumulation_and_resume(tmp_path, corpus_dir, still_model):
    """1 process x 2 micro batches = 2 processes x 1, step for step; and 2 processes resumed from the step-3
    checkpoint (every rank's RNG state restored) end where the uninterrupted run ends."""
    flags = [
        "pretrain",
        "--corpus",
        corpus_dir,
        "--model",
        still_model,
        "--max-seq-len",
        "48",
        "--batch-size",
        "4",
        "--global-batch-size",
        "8",
        "--max-steps",
        "6",
        "--warmup-ratio",
        "0.34",
        "--learning-rate",
        "2e-3",
        "--min-lr",
        "1e-4",
        "--lr-decay",
        "cosine",
        "--logging-freq",
        "1",
        "--eval-steps",
        "3",
        "--eval-iters",
        "2",
        "--test-iters",
        "3",
        "--num-workers",
        "0",
        "--no-tensorboard",
        "--checkpoint-steps",
        "3",
        "--precision",
        "fp32",
    ]
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    torchrun(*flags, "--out", str(tmp_path / "two"))
    rows = assert_same_logs(tmp_path / "one", tmp_path / "two")
    lrs = [r["lr"] for r in rows if r["split"] == "train"]
    assert lrs[-1] == pytest.approx(1e-4) and lrs.count(2e-3) == 1  # the schedule counted optimizer steps
    assert json.loads((tmp_path / "two" / "data.json").read_text())["accumulation"] == 1
    assert json.loads((tmp_path / "one" / "data.json").read_text())["accumulation"] == 2
    from safetensors.torch import load_file

    wa, wb = (
        load_file(tmp_path / "one" / "final" / "model.safetensors"),
        load_file(tmp_path / "two" / "final" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)

    step3 = tmp_path / "two" / "checkpoints" / "step-000003"
    assert (step3 / "random_states_1.pkl").is_file()
    done = torchrun(*flags, "--out", str(tmp_path / "resumed"), "--resume", str(step3))
    assert f"resumed from {step3} at step 3" in done.stdout
    later = [r for r in rows if r["step"] > 3]
    resumed = read_log(tmp_path / "resumed" / "log.jsonl")
    assert [(r["step"], r["split"]) for r in resumed] == [(r["step"], r["split"]) for r in later]
    for ra, rb in zip(later, resumed):
        assert all(rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6) for k in METRICS if k in ra), (ra, rb)
    wc = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.allclose(wa[k], wc[k], atol=1e-5) for k in wa)


def test_finetune_two_processes_equal_one_and_gather_every_dev_row_once(tmp_path, still_model):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(12, 1))
    dev = write_jsonl(tmp_path / "dev.jsonl", make_rows(5, 2))  # 15 rows: not divisible by 2 processes
    flags = [
        "finetune",
        "--model",
        still_model,
        "--train",
        train,
        "--dev",
        dev,
        "--test",
        dev,
        "--batch-size",
        "4",
        "--global-batch-size",
        "8",
        "--epochs",
        "2",
        "--learning-rate",
        "2e-3",
        "--max-seq-len",
        "32",
        "--logging-freq",
        "1",
        "--eval-steps",
        "3",
        "--warmup-ratio",
        "0.2",
    ]
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    done = torchrun(*flags, "--out", str(tmp_path / "two"))
    assert "global batch 8 = 4 x 1 accumulation x 2 processes" in done.stdout  # the layout, as pretrain prints it
    assert_same_logs(tmp_path / "one", tmp_path / "two")
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert ma["steps"] == mb["steps"] == 2 * 5  # 36 rows / 8 per step: 4 full steps and one of 4 rows, per epoch
    assert ma["dev"]["n"] == mb["dev"]["n"] == 15
    assert mb["dev"]["accuracy"] == pytest.approx(ma["dev"]["accuracy"])
    pa, pb = (
        [json.loads(x) for x in (tmp_path / d / "dev_predictions.jsonl").read_text().splitlines()]
        for d in ("one", "two")
    )
    assert [p["line"] for p in pb] == list(range(1, 16)) == [p["line"] for p in pa]
    assert [p["predicted"] for p in pa] == [p["predicted"] for p in pb]
    for x, y in zip(pa, pb):
        assert np.allclose([x["scores"][k] for k in x["scores"]], [y["scores"][k] for k in x["scores"]], atol=2e-4)
