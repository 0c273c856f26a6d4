"""Checkpoints you can trust: a manifest vouches for every file, a truncated one is skipped, kill -9 at any moment
then `--resume auto` continues as if nothing happened, and pruning never leaves the checkpoints folder."""

import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from domainlm import outputs
from domainlm.cli import main
from domainlm.train.checkpoint import find_latest
from domainlm.train.logging import read_log

FAST = [
    "--max-seq-len",
    "48",
    "--batch-size",
    "4",
    "--logging-freq",
    "1",
    "--eval-iters",
    "2",
    "--test-iters",
    "2",
    "--num-workers",
    "0",
    "--no-tensorboard",
    "--global-batch-size",
    "8",
    "--learning-rate",
    "1e-3",
    "--eval-steps",
    "4",
]


def args(corpus, model, out, *flags):
    return ["pretrain", "--corpus", corpus, "--model", model, "--out", str(out), *FAST, *flags]


def comparable(rows):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def assert_same_run(a, b):
    ra, rb = comparable(read_log(a / "log.jsonl")), comparable(read_log(b / "log.jsonl"))
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    for x, y in zip(ra, rb):  # a subprocess may use another thread count: equal up to float reduction order
        assert x.keys() == y.keys() and all(
            y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7) for k in x if k != "split"
        ), (x, y)
    from safetensors.torch import load_file

    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_checkpoint_files_load_without_pickle_and_the_manifest_lists_them(tmp_path, corpus_dir, tiny_model):
    out = tmp_path / "run"
    assert main(args(corpus_dir, tiny_model, out, "--max-steps", "2", "--checkpoint-steps", "2")) == 0
    ckpt = out / "checkpoints" / "step-000002"
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest) == on_disk and {"state.json", "model.safetensors", "optimizer.bin", "scheduler.bin"} <= on_disk
    assert all(manifest[name]["size"] == (ckpt / name).stat().st_size for name in manifest)
    optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert optimizer["state"] and optimizer["param_groups"][0]["lr"] > 0
    assert torch.load(ckpt / "scheduler.bin", weights_only=True)["last_epoch"] == 2
    assert json.loads((ckpt / "state.json").read_text())["consumed_samples"] == 16


def test_truncated_file_skips_to_the_previous_checkpoint(tmp_path, corpus_dir, tiny_model, capsys):
    out = tmp_path / "run"
    assert (
        main(args(corpus_dir, tiny_model, out, "--max-steps", "4", "--checkpoint-steps", "2", "--keep-last", "0")) == 0
    )
    weights = out / "checkpoints" / "step-000004" / "optimizer.bin"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    assert find_latest(out / "checkpoints") == out / "checkpoints" / "step-000002"
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and f"optimizer.bin has {size // 2} bytes, the manifest says {size}" in err
    assert (
        main(
            args(
                corpus_dir,
                tiny_model,
                out,
                "--max-steps",
                "6",
                "--checkpoint-steps",
                "2",
                "--keep-last",
                "0",
                "--resume",
                "auto",
            )
        )
        == 0
    )
    assert "at step 2" in capsys.readouterr().out
    assert weights.stat().st_size == size  # the resumed run wrote step 4 again, whole
    assert [r["step"] for r in read_log(out / "log.jsonl", "train")] == [1, 2, 3, 4, 5, 6]
    # a flipped byte of the same size is caught by the checksum
    state = out / "checkpoints" / "step-000006" / "scheduler.bin"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    assert find_latest(out / "checkpoints", quiet=True) == out / "checkpoints" / "step-000004"


def test_pruning_stays_inside_the_checkpoints_folder(tmp_path, corpus_dir, tiny_model, capsys):
    out = tmp_path / "run"
    elsewhere = tmp_path / "user-data"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    (out / "checkpoints").mkdir(parents=True)
    os.symlink(elsewhere, out / "checkpoints" / "step-000000")
    outputs._write_manifest(out, "pretrain", False, ["checkpoints"])  # a run of its own, interrupted
    assert (
        main(
            args(
                corpus_dir,
                tiny_model,
                out,
                "--max-steps",
                "3",
                "--checkpoint-steps",
                "1",
                "--keep-last",
                "1",
                "--resume",
                "auto",
            )
        )
        == 0
    )
    assert (elsewhere / "precious.txt").read_text() == "keep me"
    assert "not removing" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000000", "step-000003"]


def test_kill_9_at_a_random_moment_then_resume_auto_matches_the_uninterrupted_run(tmp_path, corpus_dir, tiny_model):
    flags = ["--max-steps", "12", "--checkpoint-steps", "1", "--keep-last", "2"]
    full = tmp_path / "full"
    started = time.monotonic()
    assert main(args(corpus_dir, tiny_model, full, *flags)) == 0
    took = time.monotonic() - started  # about the time the killed run needs after its first checkpoint
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "domainlm.cli", *args(corpus_dir, tiny_model, killed, *flags)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoints" / "step-000001").is_dir() and proc.poll() is None:
            assert time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.02)
        time.sleep(random.uniform(0, took))  # anywhere in steps, checkpoint writes, renames, pruning
    finally:
        proc.kill()
        proc.wait()
    assert main(args(corpus_dir, tiny_model, killed, *flags, "--resume", "auto")) == 0
    assert_same_run(full, killed)
