"""The one run-folder step (outputs.run_folder): every command that writes an --out enters it; what a run writes is
in its manifest as it is written; an earlier run is replaced only when asked, and kept whole when the new one fails;
a full disk or an unwritable folder is one line naming --out and the space left."""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from domainlm import outputs
from domainlm.cli import build_parser, main
from tests.conftest import one_line
from tests.test_bad_inputs import snapshot


def error_line(stderr: str) -> str:
    """The one error line of a run that stopped (after its progress lines), no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


# ---- every command goes through it ---------------------------------------------------------------------------

# how each command with an --out writes it: through run_folder, or (predict: one file) through the atomic writer
WRITES_BY = {"predict": "atomic_write"}


def _handler_target(handler) -> tuple[str, str]:
    """The library function a cli handler calls: (module, function), from its `from M import f` lines."""
    tree = ast.parse(inspect.getsource(handler))
    imports = {
        a.asname or a.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for a in node.names
    }
    calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    name = next(c for c in calls if c in imports and not c[0].isupper() and c not in ("read_terms",))
    return imports[name], name


def _reaches(module: str, function: str, word: str, depth: int = 3) -> bool:
    """`function` of `module` calls `word` itself, or through a function of the same module (a few levels)."""
    import importlib

    mod = importlib.import_module(module)
    source = inspect.getsource(getattr(mod, function))
    if f"{word}(" in source:
        return True
    if depth == 0:
        return False
    called = {
        n.func.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    return any(
        _reaches(module, c, word, depth - 1)
        for c in called
        if c != function and callable(getattr(mod, c, None)) and inspect.getmodule(getattr(mod, c)) is mod
    )


def test_every_command_with_an_out_enters_the_run_folder_step():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "finetune" in a.choices).choices
    with_out = sorted(
        name for name, sub in subparsers.items() if any("--out" in a.option_strings for a in sub._actions)
    )
    assert {
        "prepare",
        "merge",
        "pretrain",
        "finetune",
        "evaluate",
        "predict",
        "distill",
        "export",
        "sweep",
        "report",
        "convert",
        "extend-vocab",
        "demo",
    } <= set(with_out)
    bypass = []
    for name in with_out:
        module, function = _handler_target(subparsers[name].get_default("func"))
        if not _reaches(module, function, WRITES_BY.get(name, "run_folder")):
            bypass.append(f"{name} ({module}.{function})")
    assert not bypass, f"commands that write --out by hand: {bypass}"


def test_the_source_writes_files_through_the_one_writer_only():
    """A file written by hand (write_text, open(..., 'w'), np.save, savefig) outside the writer would be a file the
    manifest does not know, or half a file after a crash. The few that stay are listed with their reason."""
    allowed = {
        "files.py": "the atomic writer itself",
        "outputs.py": "the run folder itself",
        "train/checkpoint.py": "writes inside its own staged step folder, fsynced, swapped into place",
        "train/logging.py": "the run's log, appended as it trains (recorded in the manifest first)",
        "data/store.py": "streams the corpus into prepare's staging folder",
        "data/shards.py": "streams a shard's ledger into prepare's staging folder",
        "pretrain/samples.py": "the sample index cache, written beside and renamed into place",
        "classify/metrics.py": "draws into the path a Writer gave it",
        "sweep/report.py": "draws into the path a Writer gave it",
        "sweep/table.py": "draws into the path a Writer gave it",
        "sweep/command.py": "a GPU cell's log, streamed from its process",
        "console/": "the console's own files (uploads, job files, logs)",
        "demo.py": "the demo's tokenizer folder, built in a folder of its own before use",
        "vocab.py": "writes into the staging folder extend-vocab's run folder gave it",
    }
    pattern = ("write_text(", "write_bytes(", "open(", "np.save(", "savefig(", "json.dump(", "torch.save(")
    src = Path(__file__).resolve().parents[1] / "src" / "domainlm"
    found = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        if any(rel.startswith(a) for a in allowed):
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            if any(p in code for p in pattern) and not any(
                ok in code
                for ok in (
                    "out.write",
                    '.write_text("',
                    "folder.write",
                    "cache.write",
                    "rf.write",
                    "floor.write",
                    "target.write",
                )
            ):
                if "open(" in code and not any(m in code for m in ('"w"', "'w'", '"wb"', "'wb'", '"a"')):
                    continue  # reading
                found.append(f"{rel}:{lineno}: {line.strip()}")
    assert not found, "\n".join(found)


# ---- the manifest knows what is there, as it is written ----------------------------------------------------------


def manifest_is_the_folder(out: Path) -> dict:
    manifest = json.loads((out / outputs.MANIFEST).read_text())
    present = {p.name for p in out.iterdir()} - {outputs.MANIFEST}
    assert manifest["complete"] and set(manifest["entries"]) == present, (manifest, present)
    return manifest


def test_a_crash_leaves_a_manifest_that_knows_every_entry_and_a_rerun_clears_exactly_those(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with (
        pytest.raises(RuntimeError),
        outputs.run_folder(out, "finetune", patterns=("model", "*.json"), overwrite=False) as rf,
    ):
        rf.begin()
        rf.write_json("metrics.json", {"a": 1})
        with rf.staged("model") as folder:
            (folder / "weights").write_text("half")
            raise RuntimeError("killed")
    manifest = json.loads((out / outputs.MANIFEST).read_text())
    assert manifest == {"command": "finetune", "complete": False, "entries": ["metrics.json", "model"]}
    assert not (out / "model").exists() and not (out.parent / ".model.partial").exists()
    # an interrupted run of its own: refused without --overwrite, replaced with it; the user's file stays
    with (
        pytest.raises(Exception, match="holds an earlier interrupted `domainlm finetune` run"),
        outputs.run_folder(out, "finetune", patterns=("model", "*.json"), overwrite=False),
    ):
        pass
    with outputs.run_folder(out, "finetune", patterns=("model", "*.json"), overwrite=True) as rf:
        rf.begin()
        rf.write_json("other.json", {})
    assert sorted(p.name for p in out.iterdir()) == [outputs.MANIFEST, "notes.txt", "other.json"]
    assert json.loads((out / outputs.MANIFEST).read_text())["entries"] == ["other.json"]


def test_an_overwrite_that_fails_puts_the_earlier_run_back(tmp_path):
    out = tmp_path / "run"
    with outputs.run_folder(out, "evaluate", patterns=("*.json",), overwrite=False) as rf:
        rf.begin()
        rf.write_json("metrics.json", {"good": True})
    before = snapshot(out)
    with pytest.raises(OSError), outputs.run_folder(out, "evaluate", patterns=("*.json",), overwrite=True) as rf:
        rf.begin()
        rf.write_json("metrics.json", {"good": False})
        raise OSError("the machine went away")
    assert snapshot(out) == before and not (out / outputs.PREVIOUS).exists()


def test_a_run_killed_during_an_overwrite_finds_the_earlier_run_back_on_the_next_start(tmp_path, capsys):
    out = tmp_path / "run"
    with outputs.run_folder(out, "evaluate", patterns=("*.json",), overwrite=False) as rf:
        rf.begin()
        rf.write_json("metrics.json", {"good": True})
    before = snapshot(out)
    rf = outputs.RunFolder(
        out,
        "evaluate",
        patterns=("*.json",),
        replace=False,
        overwrite=True,
        resume=False,
        keep=(),
        flag="--out",
        main=True,
    )
    rf.earlier, rf.earlier_entries = "finished", ["metrics.json"]
    rf.begin()  # moved aside ... and the process dies (no exit from the block)
    rf.write_json("metrics.json", {"good": False})
    rf.write_json("half.json", {"written": "before the kill"})
    with (
        pytest.raises(Exception, match="holds an earlier"),
        outputs.run_folder(out, "evaluate", patterns=("*.json",), overwrite=False),
    ):
        pass
    assert "an interrupted --overwrite had moved the earlier run aside; it is back" in capsys.readouterr().err
    assert snapshot(out) == before


def test_paths_are_confined_to_the_folder(tmp_path):
    with outputs.run_folder(tmp_path / "run", "report") as rf:
        rf.begin()
        for bad in ("../escape.txt", "/etc/passwd", "a/../../b"):
            with pytest.raises(RuntimeError, match="not a path inside"):
                rf.write_text(bad, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (tmp_path / "run" / outputs.MANIFEST).write_text(
        json.dumps({"command": "report", "complete": True, "entries": ["../../victim", "ok.md"]})
    )
    assert outputs.read_manifest(tmp_path / "run")["entries"] == ["ok.md"]  # a name that leads elsewhere is dropped


# ---- the cases a user met ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from tests.test_classify import make_rows, write_jsonl

    root = tmp_path_factory.mktemp("task")
    return {
        "train": write_jsonl(root / "train.jsonl", make_rows(30, 1)),
        "test": write_jsonl(root / "test.jsonl", make_rows(9, 2)),
    }


def test_a_fold_run_with_test_is_replaced_whole_by_overwrite(tmp_path, tiny_model, task, err):
    out = tmp_path / "cv"
    base = [
        "finetune",
        "--model",
        tiny_model,
        "--train",
        task["train"],
        "--test",
        task["test"],
        "--out",
        out,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-seq-len",
        "32",
        "--precision",
        "fp32",
    ]
    err(*base, "--folds", "3", code=0)
    first = json.loads((out / "ensemble.json").read_text())["members"]
    assert first == ["fold-1", "fold-2", "fold-3"]
    assert "pass --overwrite to replace it" in one_line(err(*base, "--folds", "3"))
    err(*base, "--folds", "2", "--overwrite", code=0)  # no summary from before, no member from before
    assert json.loads((out / "ensemble.json").read_text())["members"] == ["fold-1", "fold-2"]
    assert not (out / "fold-3").exists()
    manifest_is_the_folder(out)
    err("predict", "--model", out, "--input", task["test"], "--out", tmp_path / "p.jsonl", code=0)
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == len(Path(task["test"]).read_text().splitlines())


def test_metrics_json_is_written_once_per_run(tmp_path, tiny_model, task, monkeypatch):
    from domainlm import files

    writes: dict[str, int] = {}
    real = files.atomic_write

    def counting(path, data, flag=None):
        if Path(path).name in ("metrics.json", "report.md", "summary.json"):
            writes[str(Path(path).relative_to(tmp_path))] = writes.get(str(Path(path).relative_to(tmp_path)), 0) + 1
        return real(path, data, flag)

    monkeypatch.setattr(files, "atomic_write", counting)
    common = [
        "--model",
        tiny_model,
        "--train",
        task["train"],
        "--test",
        task["test"],
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-seq-len",
        "32",
        "--precision",
        "fp32",
        "--blend",
    ]
    assert main(["finetune", *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["finetune", *common, "--folds", "2", "--out", str(tmp_path / "cv")]) == 0
    assert writes and all(n == 1 for n in writes.values()), writes
    assert {
        "one/metrics.json",
        "one/report.md",
        "one/floor/metrics.json",
        "cv/summary.json",
        "cv/fold-1/metrics.json",
        "cv/floor/fold-2/metrics.json",
    } <= set(writes)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert {"floor", "blend", "dev", "test"} <= set(one)  # the floor and the blend beside the model, in one write
    manifest_is_the_folder(tmp_path / "one")


def test_convert_takes_a_folder_for_a_conversion_only_by_its_manifest(tmp_path, err):
    from tests.test_interop import PADDLE_DIR

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.docx").write_bytes(b"years of work")
    (docs / "conversion.json").write_text('{"mine": true}')
    before = snapshot(docs)
    for flags in ([], ["--overwrite"]):
        message = one_line(err("convert", PADDLE_DIR, "--out", docs, *flags))
        assert f"--out {docs} holds conversion.json, thesis.docx, not from `domainlm convert`" in message
        assert snapshot(docs) == before


def test_pretrain_into_a_finished_run_needs_overwrite_even_without_its_checkpoints(
    tmp_path, corpus_dir, tiny_model, err
):
    out = tmp_path / "pt"
    base = [
        "pretrain",
        "--corpus",
        corpus_dir,
        "--model",
        tiny_model,
        "--out",
        out,
        "--max-seq-len",
        "48",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--num-workers",
        "0",
        "--no-tensorboard",
        "--precision",
        "fp32",
    ]
    err(*base, code=0)
    shutil.rmtree(out / "checkpoints")  # to save space
    before = snapshot(out)
    message = one_line(err(*base))
    assert "holds an earlier finished `domainlm pretrain` run" in message and "pass --overwrite" in message
    assert "no checkpoint to resume from" in one_line(err(*base, "--resume", "auto"))
    assert snapshot(out) == before
    assert "--resume and --overwrite both given" in one_line(err(*base, "--resume", "auto", "--overwrite"))
    err(*base, "--overwrite", "--max-steps", "3", code=0)
    assert json.loads((out / "results.json").read_text())["step"] == 3


# ---- a full disk, an immutable folder --------------------------------------------------------------------------


def _tmpfs(path: Path, size: str = "6m"):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    return path


@pytest.fixture
def small_disk(tmp_path):
    disk = _tmpfs(tmp_path / "disk")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave_kb: int) -> None:
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_kb * 1024))


def test_a_full_disk_is_one_line_naming_out_and_leaves_no_staging(
    small_disk, tmp_path, tiny_model, task, corpus_dir, zh_txt, tokenizer_dir, err
):
    common = ["--epochs", "1", "--batch-size", "8", "--max-seq-len", "32", "--precision", "fp32", "--no-floor"]
    # finetune: the model does not fit (it is written after training)
    _fill(small_disk, 64)
    out = small_disk / "ft"
    message = error_line(err("finetune", "--model", tiny_model, "--train", task["train"], "--out", out, *common))
    assert "could not write: the disk is full" in message and "MB free there" in message and str(out) in message
    assert not list(small_disk.glob(".*partial*")) and not list(out.glob(".*partial*"))
    (small_disk / "filler").unlink()
    # an earlier good run, then an --overwrite that cannot finish: the earlier run is what stays
    err("finetune", "--model", tiny_model, "--train", task["train"], "--out", out, *common, "--overwrite", code=0)
    before = snapshot(out)
    _fill(small_disk, 64)
    message = error_line(
        err("finetune", "--model", tiny_model, "--train", task["train"], "--out", out, *common, "--overwrite")
    )
    assert "the disk is full" in message and snapshot(out) == before
    # predict: one file
    (small_disk / "filler").unlink()
    _fill(small_disk, 1)
    message = error_line(err("predict", "--model", out, "--input", task["test"], "--out", small_disk / "p.jsonl"))
    assert f"--out {small_disk / 'p.jsonl'}: could not write: the disk is full" in message
    assert not (small_disk / "p.jsonl").exists() and not list(small_disk.glob(".p.jsonl*"))
    # prepare: the store goes to a staging folder beside --out, removed
    store = small_disk / "store"
    message = error_line(err("prepare", zh_txt, "--out", store, "--tokenizer", tokenizer_dir, "--workers", "0"))
    assert f"--out {store}" in message and "the disk is full" in message
    assert not store.exists() and not (small_disk / ".store.partial").exists()
    # pretrain: a checkpoint that does not fit is one line; its temporary goes, the run's log stays
    (small_disk / "filler").unlink()
    _fill(small_disk, 300)
    pt = small_disk / "pt"
    message = error_line(
        err(
            "pretrain",
            "--corpus",
            corpus_dir,
            "--model",
            tiny_model,
            "--out",
            pt,
            "--max-seq-len",
            "48",
            "--batch-size",
            "4",
            "--max-steps",
            "2",
            "--num-workers",
            "0",
            "--no-tensorboard",
            "--precision",
            "fp32",
        )
    )
    assert "the disk is full" in message and "MB free there" in message
    assert not list(pt.rglob(".*tmp*")) and not list(pt.rglob("*.partial"))


def test_an_immutable_out_is_refused_before_any_work(tmp_path, zh_txt, tokenizer_dir, err):
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root")
    out = tmp_path / "store"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
        pytest.skip("this file system does not take the immutable attribute")
    try:
        message = one_line(err("prepare", zh_txt, "--out", out, "--tokenizer", tokenizer_dir, "--workers", "0"))
        assert f"--out {out}: cannot write in {out}" in message and "choose a writable folder" in message
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=False)
