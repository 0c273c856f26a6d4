"""Beyond one machine, on one machine: two torchrun "nodes" (c10d rendezvous on 127.0.0.1) equal two processes on one
node; a node that never comes ends in one line; a worker killed mid-run is restarted by torch's elastic agent and the
run ends where an uninterrupted one ends; a --out that the nodes do not share is refused in one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from domainlm.cli import main
from tests.conftest import one_line
from tests.test_classify import make_rows, write_jsonl
from tests.test_train_distributed import assert_same_logs, still_model  # noqa: F401  (a fixture)

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PRETRAIN = [
    "--max-seq-len",
    "48",
    "--batch-size",
    "4",
    "--global-batch-size",
    "8",
    "--warmup-ratio",
    "0.34",
    "--learning-rate",
    "2e-3",
    "--min-lr",
    "1e-4",
    "--logging-freq",
    "1",
    "--eval-iters",
    "2",
    "--test-iters",
    "2",
    "--num-workers",
    "0",
    "--no-tensorboard",
    "--precision",
    "fp32",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node(port: int, *args, cwd=None, join_timeout: int = 60, launcher=("-m", "torch.distributed.run")):
    """One torchrun "node" of two (one process each), started in the background."""
    cmd = [
        sys.executable,
        *launcher,
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "test",
        "--rdzv-conf",
        f"join_timeout={join_timeout}",
    ]
    if launcher[-1] != "launch":
        cmd += ["-m", "domainlm.cli"]
    return subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd)


def two_nodes(*args, cwd=(None, None), launcher=("-m", "torch.distributed.run")) -> list[tuple[int, str, str]]:
    port = free_port()
    nodes = [node(port, *args, cwd=c, launcher=launcher) for c in cwd]
    done = []
    for p in nodes:
        out, err = p.communicate(timeout=240)
        done.append((p.returncode, out, err))
    return done


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < 1e-5, worst


# The runs on two nodes are compared with one process (accumulating the two micro batches), which
# tests/test_train_distributed.py finds equal to two processes on one node: the same comparison, one launch less.


def test_two_nodes_pretrain_as_two_processes_on_one_node(tmp_path, corpus_dir, still_model):
    flags = [
        "pretrain",
        "--corpus",
        corpus_dir,
        "--model",
        still_model,
        *PRETRAIN,
        "--max-steps",
        "4",
        "--eval-steps",
        "2",
        "--checkpoint-steps",
        "2",
    ]
    assert main([*flags, "--out", str(tmp_path / "one-node")]) == 0
    results = two_nodes(*flags, "--out", str(tmp_path / "two-nodes"))
    assert [code for code, _, _ in results] == [0, 0], [err[-3000:] for _, _, err in results]
    said = "".join(out for _, out, _ in results)
    assert "global batch 8 = 4 x 1 accumulation x 2 processes" in said and said.count("done: ") == 1  # rank 0 alone
    assert_same_logs(tmp_path / "one-node", tmp_path / "two-nodes")
    assert_same_weights(tmp_path / "one-node" / "final", tmp_path / "two-nodes" / "final")
    # the checkpoint is one folder, written once, with each rank's random state in it
    step = tmp_path / "two-nodes" / "checkpoints" / "step-000004"
    assert sorted(p.name for p in step.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]


def test_two_nodes_finetune_as_two_processes_on_one_node(tmp_path, still_model):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(8, 1))
    dev = write_jsonl(tmp_path / "dev.jsonl", make_rows(5, 2))
    flags = [
        "finetune",
        "--model",
        still_model,
        "--train",
        train,
        "--dev",
        dev,
        "--batch-size",
        "4",
        "--global-batch-size",
        "8",
        "--epochs",
        "1",
        "--learning-rate",
        "2e-3",
        "--max-seq-len",
        "32",
        "--logging-freq",
        "1",
        "--precision",
        "fp32",
    ]
    assert main([*flags, "--out", str(tmp_path / "one-node")]) == 0
    results = two_nodes(*flags, "--out", str(tmp_path / "two-nodes"))
    assert [code for code, _, _ in results] == [0, 0], [err[-3000:] for _, _, err in results]
    assert_same_logs(tmp_path / "one-node", tmp_path / "two-nodes")
    assert_same_weights(tmp_path / "one-node" / "model", tmp_path / "two-nodes" / "model")


def test_a_node_that_never_joins_ends_in_one_line(tmp_path):
    started = time.monotonic()
    p = node(
        free_port(),
        "pretrain",
        "--corpus",
        "c",
        "--model",
        "m",
        "--out",
        str(tmp_path / "run"),
        join_timeout=2,
        launcher=("-m", "domainlm.cli", "launch"),
    )
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and time.monotonic() - started < 60
    line = one_line(err)
    assert (
        line.startswith("error: the rendezvous at 127.0.0.1:")
        and "did not gather --nnodes 2 within the join timeout of 2 s: start the same command on every node" in line
    )
    assert not (tmp_path / "run").exists()


def test_an_out_the_nodes_do_not_share_is_refused_in_one_line(tmp_path, corpus_dir, still_model):
    """Each "node" runs in a folder of its own and names --out relatively: as two machines with local disks."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    results = two_nodes(
        "pretrain",
        "--corpus",
        corpus_dir,
        "--model",
        still_model,
        *PRETRAIN,
        "--max-steps",
        "2",
        "--out",
        "run",
        cwd=(tmp_path / "a", tmp_path / "b"),
        launcher=("-m", "domainlm.cli", "launch"),
    )
    assert [code for code, _, _ in results] == [2, 2]
    for _, _, err in results:
        lines = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
        assert lines[0].startswith("error: --out run: rank 1 (on ") and "does not see the files rank 0 (on " in lines[0]
        assert "--out must be a folder every node shares" in lines[0]
    # the node of rank 1 wrote nothing (which node is rank 0 is the rendezvous's choice)
    assert sorted((tmp_path / n / "run").exists() for n in ("a", "b")) == [False, True]


def _workers(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The domainlm worker processes under a torchrun agent, by local rank."""
    found = {}
    for child in launcher.children(recursive=True):
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "LOCAL_RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            found[int(env["LOCAL_RANK"])] = child
    return found


def test_a_killed_worker_is_restarted_and_the_run_ends_as_an_uninterrupted_one(tmp_path, corpus_dir, still_model):
    """--max-restarts 1: kill -9 of rank 1 once a checkpoint exists; torch's agent stops the group and starts it again,
    `--resume auto` continues from the newest complete checkpoint, and the final weights are those of a run that was
    never interrupted (same checkpoint steps)."""
    flags = [
        "pretrain",
        "--corpus",
        corpus_dir,
        "--model",
        still_model,
        *PRETRAIN,
        "--max-steps",
        "12",
        "--eval-steps",
        "0",
        "--checkpoint-steps",
        "3",
        "--keep-last",
        "0",
    ]
    assert main([*flags, "--out", str(tmp_path / "uninterrupted")]) == 0
    out = tmp_path / "elastic"
    cmd = [
        sys.executable,
        "-m",
        "domainlm.cli",
        "launch",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.1",
        *flags,
        "--out",
        str(out),
        "--resume",
        "auto",
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    launcher = psutil.Process(p.pid)
    killed = None
    deadline = time.monotonic() + 180
    while killed is None and time.monotonic() < deadline and p.poll() is None:
        if (out / "checkpoints" / "step-000003" / "manifest.json").is_file():
            worker = _workers(launcher).get(1)
            if worker is not None:
                os.kill(worker.pid, signal.SIGKILL)
                killed, finished = worker.pid, (out / "final").exists()
        time.sleep(0.01)
    stdout, stderr = p.communicate(timeout=240)
    assert killed is not None and not finished, "the run ended before a checkpoint could be seen"
    assert p.returncode == 0, stderr[-4000:]
    resumed = [line for line in stdout.splitlines() if line.startswith("resumed from ")]
    assert len(resumed) == 1 and "/checkpoints/step-0000" in resumed[0], stdout[-3000:]
    assert_same_weights(tmp_path / "uninterrupted" / "final", out / "final")
    assert_same_logs(tmp_path / "uninterrupted", out)
