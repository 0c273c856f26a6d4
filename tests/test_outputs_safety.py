"""--out is never a place where the user's files get lost: each command with an --out refuses a folder holding
files it did not write (naming the folder), replaces only its own (the manifest it leaves there), and a folder it
replaces whole is swapped in only once complete."""

import os
import shutil
from pathlib import Path

import pytest

from domainlm import outputs
from domainlm.cli import main
from domainlm.errors import DomainLMError
from tests.test_bad_inputs import snapshot
from tests.test_interop import PADDLE_DIR


@pytest.fixture
def err(capsys):
    def run(*args, code=2):
        capsys.readouterr()
        assert main([str(a) for a in args]) == code
        return capsys.readouterr().err
    return run


# ---- the helpers ------------------------------------------------------------------------------------------

def test_inside_follows_links_and_strict_excludes_the_root(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert outputs.inside(tmp_path / "link" / "b", tmp_path / "a")
    assert outputs.inside(tmp_path / "a", tmp_path / "a") and not outputs.inside(tmp_path / "a", tmp_path / "a", strict=True)
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
    with pytest.raises(OSError, match="No space left"):
        main(["convert", str(PADDLE_DIR), "--out", str(out), "--overwrite"])
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
    assert f"--out {tmp_path / 'models'} holds the input {src}" in err("convert", src, "--out", tmp_path / "models", "--overwrite")
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
