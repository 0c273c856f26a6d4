"""Guards of the newer features: numbers that are not numbers, a loss that stops being one, paths that come from
files, damaged caches, inputs that are not what they claim, presets that chose a value, and outputs that would
mislead."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from domainlm.cli import main
from tests.conftest import one_line
from tests.test_bad_inputs import snapshot
from tests.test_classify import FAST, make_rows, write_jsonl


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    return {
        "train": write_jsonl(root / "train.jsonl", make_rows(30, 1)),
        "test": write_jsonl(root / "test.jsonl", make_rows(9, 2)),
        "root": root,
    }


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_model, task):
    out = tmp_path_factory.mktemp("clf") / "ft"
    assert (
        main(
            [
                "finetune",
                "--model",
                tiny_model,
                "--train",
                task["train"],
                "--out",
                str(out),
                *FAST,
                "--epochs",
                "1",
                "--no-floor",
            ]
        )
        == 0
    )
    return out


# ---- numbers that are not numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--adam-beta1", "1", "--adam-beta1 = 1.0 is out of range [0, 1)"),
        ("--adam-beta2", "1.0", "--adam-beta2 = 1.0 is out of range [0, 1)"),
        ("--adam-beta1", "nan", "--adam-beta1 = nan is not a number"),
        ("--adam-epsilon", "nan", "--adam-epsilon = nan is not a number"),
        ("--learning-rate", "nan", "--learning-rate = nan is not a number"),
        ("--max-grad-norm", "nan", "--max-grad-norm = nan is not a number"),
        ("--layer-lr-decay", "nan", "--layer-lr-decay = nan is not a number"),
        ("--learning-rate", "inf", "--learning-rate = inf is not a finite number"),
        ("--max-grad-norm", "-inf", "--max-grad-norm = -inf is not a finite number"),
    ],
)
def test_a_float_option_must_be_a_finite_number_in_the_range_the_optimizer_takes(
    tmp_path, tiny_model, task, err, flag, value, message
):
    out = tmp_path / "o"
    assert message in one_line(
        err("finetune", "--model", tiny_model, "--train", task["train"], "--out", out, f"{flag}={value}")
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--alpha", "nan", "--alpha = nan is not a number"),
        ("--temperature", "nan", "--temperature = nan is not a number"),
        ("--temperature", "inf", "--temperature = inf is not a finite number"),
    ],
)
def test_distill_numbers(tmp_path, tiny_model, classifier, task, err, flag, value, message):
    assert message in one_line(
        err(
            "distill",
            "--teacher",
            classifier,
            "--student",
            tiny_model,
            "--train",
            task["train"],
            "--out",
            tmp_path / "o",
            flag,
            value,
        )
    )


def test_inf_is_taken_where_it_means_something(tmp_path, tiny_model, task, err):
    err(
        "finetune",
        "--model",
        tiny_model,
        "--train",
        task["train"],
        "--out",
        tmp_path / "o",
        *FAST,
        "--epochs",
        "1",
        "--no-floor",
        "--max-grad-norm",
        "inf",
        code=0,
    )  # no clipping
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["steps"] > 0


def test_a_non_finite_loss_stops_the_run_and_saves_nothing(tmp_path, tiny_model, corpus_dir, task, err, monkeypatch):
    import torch

    from domainlm.classify.model import Classifier
    from domainlm.pretrain.model import PretrainingModel

    def nan_from_step(cls, step: int):
        real = cls.forward
        calls = {"n": 0}

        def forward(self, *a, **k):
            loss, metrics = real(self, *a, **k)
            if self.training:
                calls["n"] += 1
                if calls["n"] >= step:
                    loss = loss * torch.tensor(float("nan"))
            return loss, metrics

        monkeypatch.setattr(cls, "forward", forward)

    nan_from_step(Classifier, 3)
    out = tmp_path / "ft"
    message = one_line(
        err(
            "finetune",
            "--model",
            tiny_model,
            "--train",
            task["train"],
            "--out",
            out,
            *FAST,
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--no-floor",
        )
    )
    assert "step 3: the loss (or its gradient) is not a finite number; the last finite loss was" in message
    assert "at step 2" in message and "--learning-rate 0.002" in message and "saved nothing" in message
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    nan_from_step(PretrainingModel, 2)
    pt = tmp_path / "pt"
    message = one_line(
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
            "4",
            "--checkpoint-steps",
            "1",
            "--num-workers",
            "0",
            "--no-tensorboard",
            "--precision",
            "fp32",
        )
    )
    assert "step 2: the loss (or its gradient) is not a finite number" in message
    assert not (pt / "final").exists() and [p.name for p in (pt / "checkpoints").glob("step-*")] == ["step-000001"]


# ---- paths that come from files ----------------------------------------------------------------------------------


def test_an_ensemble_member_outside_its_folder_is_refused(tmp_path, classifier, err):
    ensemble = tmp_path / "cv"
    (ensemble / "fold-1").mkdir(parents=True)
    shutil.copytree(classifier / "model", ensemble / "fold-1" / "model")
    shutil.copytree(classifier / "model", tmp_path / "m2")
    labels = json.loads((classifier / "model" / "domainlm_labels.json").read_text())["labels"]
    (ensemble / "ensemble.json").write_text(json.dumps({"members": ["fold-1", "../m2"], "labels": labels}))
    out = tmp_path / "exports" / "e"
    message = one_line(err("export", ensemble, "--out", out))
    assert "member '../m2' is not a folder inside" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv", "m2"]  # nothing written anywhere
    assert "is not a folder inside" in one_line(
        err("predict", "--model", ensemble, "--input", classifier / ".." / "x.jsonl")
    )


def test_distill_out_inside_the_teacher_is_refused(tiny_model, classifier, task, err):
    before = snapshot(classifier)
    message = one_line(
        err(
            "distill",
            "--teacher",
            classifier,
            "--student",
            tiny_model,
            "--train",
            task["train"],
            "--out",
            classifier / "model",
            "--max-seq-len",
            "32",
        )
    )
    assert f"--out {classifier / 'model'} lies inside --teacher {classifier}" in message
    assert snapshot(classifier) == before


# ---- caches and inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated npz", "cut json", "object array", "other checksum"])
def test_a_damaged_teacher_cache_is_computed_again(tmp_path, tiny_model, classifier, task, err, damage):
    out = tmp_path / "d"
    args = [
        "distill",
        "--teacher",
        classifier,
        "--student",
        tiny_model,
        "--train",
        task["train"],
        "--out",
        out,
        *FAST,
        "--epochs",
        "1",
        "--no-floor",
    ]
    err(*args, code=0)
    (npz,) = (out / "teacher_cache").glob("*.npz")
    meta = npz.with_suffix(".json")
    if damage == "truncated npz":
        npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    elif damage == "cut json":
        meta.write_text(meta.read_text()[:20])
    elif damage == "object array":
        np.savez(npz.with_suffix(""), **{"fit-1234": np.array([object()], dtype=object)})
    else:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "sha256": "0" * 64}))
    message = err(*args, "--overwrite", code=0)
    assert f"the teacher cache {npz} is damaged" in message and "computing the teacher's outputs again" in message
    assert "teacher outputs: computed and cached" in message
    assert "reused" in err(*args, "--overwrite", code=0)  # and the cache written again is good


def test_inputs_that_are_not_what_they_claim(tmp_path, tiny_model, classifier, task, err):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    base = ["finetune", "--model", tiny_model, "--out", tmp_path / "o", *FAST]
    assert f"--train {folder} is a folder; it must name a file" in one_line(err(*base, "--train", folder))
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    assert f"--train {binary}:2: not text (neither UTF-8 nor GB18030)" in one_line(err(*base, "--train", binary))
    assert "--test" in one_line(err(*base, "--train", task["train"], "--test", folder))
    gbk = tmp_path / "gbk.jsonl"
    gbk.write_bytes(Path(task["train"]).read_text(encoding="utf-8").encode("gb18030"))
    err(*base, "--train", gbk, "--epochs", "1", "--no-floor", code=0)  # GBK data is read as GB18030
    assert "--input" in one_line(
        err("predict", "--model", classifier, "--input", folder, "--out", tmp_path / "p.jsonl")
    )
    assert f"--config {folder} is a folder" in one_line(err("finetune", "--config", folder))
    assert f"--unlabeled {folder} is a folder" in one_line(
        err(
            "distill",
            "--teacher",
            classifier,
            "--student",
            tiny_model,
            "--train",
            task["train"],
            "--out",
            tmp_path / "d",
            "--unlabeled",
            folder,
            "--max-seq-len",
            "32",
        )
    )


def test_the_large_model_preset_says_what_it_set(tmp_path, tiny_model, task, err, monkeypatch):
    from domainlm import precision

    monkeypatch.setattr(precision, "_SAID", set())  # said once per process: this test's process may have said it
    # its 1% validation share is one row of a small task: said, naming the preset
    notice = err(
        "finetune",
        "--model",
        tiny_model,
        "--train",
        task["train"],
        "--out",
        tmp_path / "o",
        "--preset",
        "large-model",
        "--max-seq-len",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--no-floor",
        code=0,
    )
    assert "--valid-ratio 0.01 (set by --preset large-model) holds out 1 of 90 training rows" in notice
    assert "precision bf16 (this CPU has" in notice or "precision fp32 (this CPU has no native bf16" in notice
    # an error about a value the preset set names the preset
    message = one_line(
        err(
            "finetune",
            "--model",
            tiny_model,
            "--train",
            task["train"],
            "--out",
            tmp_path / "x",
            "--preset",
            "large-model",
        )
    )
    assert "--max-seq-len 512 exceeds what the model" in message and "(set by --preset large-model;" in message


# ---- outputs that mislead ----------------------------------------------------------------------------------------


def test_predict_keeps_an_existing_file_unless_overwrite(tmp_path, classifier, task, err):
    mine = tmp_path / "labelled.jsonl"
    shutil.copy(task["test"], mine)
    before = mine.read_bytes()
    assert f"--out {mine} exists; pass --overwrite" in one_line(
        err("predict", "--model", classifier, "--input", task["test"], "--out", mine)
    )
    assert mine.read_bytes() == before
    err("predict", "--model", classifier, "--input", task["test"], "--out", mine, "--overwrite", code=0)
    assert "scores" in mine.read_text().splitlines()[0]


def test_an_unknown_token_share_is_said_with_what_to_do(tmp_path, tiny_model, task, err):
    from domainlm.demo import trimmed_vocabulary

    # the demo marks the vocabulary it cut to its own texts; a model saved with it carries the mark
    cut = trimmed_vocabulary(Path(tiny_model), ["酒店很好"], tmp_path / "cut")
    mark = json.loads((cut / "tokenizer_config.json").read_text())["domainlm_vocabulary"]
    assert mark["kept"] < mark["entries"] and mark["trimmed_from"] == Path(tiny_model).name
    # the test tokenizer, marked so: it misses ~9% of these rows' tokens
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "domainlm_vocabulary": mark}))
    notice = err(
        "finetune",
        "--model",
        model,
        "--train",
        task["train"],
        "--out",
        tmp_path / "o",
        *FAST,
        "--epochs",
        "1",
        "--no-floor",
        code=0,
    )
    assert "of --train are [UNK] for the tokenizer of --model" in notice
    assert "its vocabulary was cut to the texts it was made for" in notice and "domainlm extend-vocab" in notice
    quiet = err(
        "finetune",
        "--model",
        tiny_model,
        "--train",
        task["train"],
        "--out",
        tmp_path / "p",
        *FAST,
        "--epochs",
        "1",
        "--no-floor",
        code=0,
    )
    assert "[UNK]" not in quiet


def test_a_document_split_that_holds_out_a_large_share_says_so(tmp_path, tokenizer_dir, tiny_model, err, capsys):
    from tests.conftest import make_documents

    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(make_documents(15, seed=3)), encoding="utf-8")  # 15 chapters
    err(
        "prepare",
        book,
        "--out",
        tmp_path / "c",
        "--tokenizer",
        tokenizer_dir,
        "--workers",
        "0",
        "--near-dup-threshold",
        "0",
        code=0,
    )
    assert (
        main(
            [
                "pretrain",
                "--corpus",
                str(tmp_path / "c"),
                "--model",
                tiny_model,
                "--out",
                str(tmp_path / "pt"),
                "--max-seq-len",
                "48",
                "--batch-size",
                "4",
                "--max-steps",
                "1",
                "--num-workers",
                "0",
                "--no-tensorboard",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "split: valid and test hold out 2 of 15 documents" in out and "--split 98,1,1 asked for 2%" in out
