"""--out is never a place where the user's files get lost: each command with an --out refuses a folder holding
files it did not write (naming the folder), replaces only its own (the manifest it leaves there), and a folder it
replaces whole is swapped in only once complete."""

import os
import shutil
from pathlib import Path

import pytest

from domainlm import outputs
from domainlm.errors import DomainLMError
from tests.test_bad_inputs import snapshot
from tests.test_interop import PADDLE_DIR

# ---- the helpers ------------------------------------------------------------------------------------------


def test_inside_follows_links_and_strict_excludes_the_root(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert outputs.inside(tmp_path / "link" / "b", tmp_path / "a")
    assert outputs.inside(tmp_path / "a", tmp_path / "a") and not outputs.inside(
        tmp_path / "a", tmp_path / "a", strict=True
    )
    assert not outputs.inside(tmp_path / "ab", tmp_path / "a")
    with pytest.raises(DomainLMError, match="does not lie inside"):
        outputs.remove_tree(tmp_path / "link", tmp_path / "a")


def test_stage_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError), outputs.stage(target) as work:
        (work / "weights").write_text("half")
        raise RuntimeError("killed midway")
    assert snapshot(target) == {"weights": b"old"} and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with outputs.stage(target) as work:
        (work / "weights").write_text("new")
    assert snapshot(target) == {"weights": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---- convert ----------------------------------------------------------------------------------------------


def test_convert_over_an_earlier_output_keeps_it_when_the_new_one_fails(tmp_path, err, monkeypatch):
    out = tmp_path / "hf"
    err("convert", PADDLE_DIR, "--out", out, code=0)
    before = snapshot(out)
    import transformers

    def fail(self, *a, **k):
        (Path(a[0]) / "model.safetensors").write_bytes(b"half written")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", fail)
    message = err("convert", PADDLE_DIR, "--out", out, "--overwrite")  # one line, naming --out and the space left
    assert f"--out {out}: could not write: the disk is full (" in message and "MB free there)" in message
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    monkeypatch.undo()
    err("convert", PADDLE_DIR, "--out", out, "--overwrite", code=0)  # its own earlier output: replaced
    assert (out / outputs.MANIFEST).is_file() and snapshot(out).keys() == before.keys()


def test_convert_never_replaces_the_users_files(tmp_path, err, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.docx").write_bytes(b"years of work")
    message = err("convert", PADDLE_DIR, "--out", docs, "--overwrite")
    assert f"--out {docs} holds thesis.docx, not from `domainlm convert`" in message
    assert snapshot(docs) == {"thesis.docx": b"years of work"}
    # the parent of SRC: SRC would go with it
    src = tmp_path / "models" / "ernie"
    shutil.copytree(PADDLE_DIR, src)
    before = snapshot(tmp_path / "models")
    assert f"--out {tmp_path / 'models'} holds the input {src}" in err(
        "convert", src, "--out", tmp_path / "models", "--overwrite"
    )
    assert snapshot(tmp_path / "models") == before
    # the working folder
    monkeypatch.chdir(docs)
    assert "--out . is (or holds) the working folder" in err("convert", src, "--out", ".", "--overwrite")
    assert snapshot(docs) == {"thesis.docx": b"years of work"}
    # an existing regular file
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"mine")
    assert f"--out {a_file} is an existing file" in err("convert", src, "--out", a_file, "--overwrite")
    assert a_file.read_bytes() == b"mine"


# ---- every other command with an --out: the user's files under its names are refused, byte for byte kept ------


def users_folder(tmp_path, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "mine"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def refused(err, folder, command, *args, names):
    before = snapshot(folder)
    message = err(command, *args)
    assert f"--out {folder} holds {names}, not from `domainlm {command}`" in message, message
    assert len(message.strip().splitlines()) == 1 and snapshot(folder) == before


def test_sweep_keeps_the_users_table(tmp_path, tiny_model, err):
    import yaml

    from tests.test_classify import make_rows, write_jsonl

    mine = users_folder(tmp_path, {"table.md": b"| my | table |\n"})
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "out": str(mine),
                "seeds": [1],
                "models": [{"name": "tiny", "base": tiny_model}],
                "finetune": {
                    "train": write_jsonl(tmp_path / "t.jsonl", make_rows(12, 1)),
                    "test": write_jsonl(tmp_path / "e.jsonl", make_rows(4, 2)),
                },
            }
        )
    )
    refused(err, mine, "sweep", spec, names="table.md")


def test_report_out_keeps_the_users_report(tmp_path, err):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    mine = users_folder(tmp_path, {"report.md": b"my report", "report.html": b"<p>mine</p>"})
    refused(err, mine, "report", run, "--out", mine, names="report.html, report.md")
    err("report", run, "--out", tmp_path / "rep", code=0)  # its own folder: written, and rewritten with --overwrite
    assert "pass --overwrite" in err("report", run, "--out", tmp_path / "rep")
    err("report", run, "--out", tmp_path / "rep", "--overwrite", code=0)
    assert (tmp_path / "rep" / "report.md").is_file()


def test_pretrain_out_keeps_the_users_config_and_results(tmp_path, tiny_model, err):
    mine = users_folder(tmp_path, {"config.yaml": b"mine: 1\n", "results.json": b"{}", "notes.txt": b"x"})
    refused(
        err,
        mine,
        "pretrain",
        "--corpus",
        tmp_path / "c",
        "--model",
        tiny_model,
        "--out",
        mine,
        names="config.yaml, results.json",
    )


def test_demo_out_keeps_the_users_data(tmp_path, err):
    mine = users_folder(tmp_path, {"data/sentiment_train.jsonl": b'{"text": "mine"}\n'})
    refused(err, mine, "demo", "--out", mine, names="data")


def test_finetune_and_evaluate_keep_the_users_files_of_their_names(tmp_path, tiny_model, err):
    from tests.test_classify import make_rows, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", make_rows(12, 1))
    mine = users_folder(tmp_path, {"report.md": b"mine", "metrics.json": b"{}"})
    refused(
        err,
        mine,
        "finetune",
        "--model",
        tiny_model,
        "--train",
        train,
        "--out",
        mine,
        "--overwrite",
        names="metrics.json, report.md",
    )
    refused(
        err, mine, "evaluate", "--model", tiny_model, "--data", train, "--out", mine, names="metrics.json, report.md"
    )


def test_extend_vocab_into_a_folder_of_the_users(tmp_path, tiny_model, err):
    terms = tmp_path / "terms.txt"
    terms.write_text("验收标准\n")
    mine = users_folder(tmp_path, {"vocab.txt": b"mine"})
    refused(err, mine, "extend-vocab", "--model", tiny_model, "--tokens", terms, "--out", mine, names="vocab.txt")


def test_prepare_never_replaces_the_working_folder_nor_writes_after_the_work_into_an_unwritable_one(
    tmp_path, zh_txt, tokenizer_dir, err, monkeypatch
):
    work = users_folder(tmp_path, {"notes.txt": b"mine"})
    monkeypatch.chdir(work)
    message = err("prepare", zh_txt, "--out", ".", "--tokenizer", tokenizer_dir, "--workers", "0", "--overwrite")
    assert "--out . is (or holds) the working folder" in message and snapshot(work) == {"notes.txt": b"mine"}
    monkeypatch.chdir(tmp_path)
    target = Path("/proc/domainlm-store")  # a read-only place, even for root
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        target = ro / "store"
    message = err("prepare", zh_txt, "--out", target, "--tokenizer", tokenizer_dir, "--workers", "0")
    assert f"--out {target}: cannot write in {target.parent}" in message and "Traceback" not in message


# ---- a killed run resumes at once -------------------------------------------------------------------------


def test_a_run_killed_with_sigkill_resumes_at_once_though_its_loader_workers_live_on(
    tmp_path, corpus_dir, tiny_model, err
):
    import signal
    import subprocess
    import sys
    import time

    from tests.test_bad_inputs import env

    out = tmp_path / "run"
    args = [
        "pretrain",
        "--corpus",
        corpus_dir,
        "--model",
        tiny_model,
        "--out",
        str(out),
        "--max-seq-len",
        "48",
        "--batch-size",
        "4",
        "--checkpoint-steps",
        "2",
        "--num-workers",
        "2",
        "--no-tensorboard",
        "--logging-freq",
        "1000",
        "--eval-steps",
        "1000",
    ]
    run = subprocess.Popen(
        [sys.executable, "-m", "domainlm.cli", *args, "--max-steps", "100000"],
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not list((out / "checkpoints").glob("step-*/manifest.json")) and time.monotonic() < deadline:
            assert run.poll() is None, "the run ended early"
            time.sleep(0.2)
        workers = subprocess.run(["pgrep", "-P", str(run.pid)], capture_output=True, text=True).stdout.split()
        assert workers, "the run has no DataLoader workers: the test would not test the lock they inherit"
        run.send_signal(signal.SIGKILL)
        run.wait()
    finally:
        run.kill()
    assert all(Path(f"/proc/{pid}").exists() for pid in workers)  # orphaned, still running when the resume starts
    step = int(max(p.parent.name for p in (out / "checkpoints").glob("step-*/manifest.json")).split("-")[1])
    message = err(*args, "--num-workers", "0", "--resume", "auto", "--max-steps", step + 1, code=0)
    assert "in use" not in message
    assert (out / "final" / "config.json").is_file()
