"""`domainlm distill`: alpha = 1 is plain fine-tuning, the KL to a fixed teacher goes down, the teacher's outputs
are cached and reused, the student is a normal classifier folder, bad inputs are one-line errors naming the flag."""

import json

import pytest

from domainlm.cli import main
from tests.test_classify import FAST, make_rows, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("distill")
    train = write_jsonl(root / "train.jsonl", make_rows(14, 1))
    test = write_jsonl(root / "test.jsonl", make_rows(5, 2))
    unlabeled = root / "reviews.txt"
    unlabeled.write_text("\n".join(r["text"] for r in make_rows(10, 3)) + "\n", encoding="utf-8")
    teacher = root / "teacher"
    assert (
        main(
            [
                "finetune",
                "--model",
                tiny_model,
                "--train",
                train,
                "--out",
                str(teacher),
                *FAST,
                "--epochs",
                "4",
                "--no-floor",
            ]
        )
        == 0
    )
    return {"root": root, "train": train, "test": test, "unlabeled": str(unlabeled), "teacher": str(teacher)}


def log(out, split="train"):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["split"] == split]


def distill(setup, tiny_model, out, *flags):
    return main(
        [
            "distill",
            "--teacher",
            setup["teacher"],
            "--student",
            tiny_model,
            "--train",
            setup["train"],
            "--out",
            str(out),
            *FAST,
            *flags,
        ]
    )


def test_alpha_one_is_plain_finetuning(setup, tiny_model, tmp_path):
    flags = ["--epochs", "2", "--logging-freq", "1", "--precision", "fp32", "--max-seq-len", "64"]
    assert (
        main(
            [
                "finetune",
                "--model",
                tiny_model,
                "--train",
                setup["train"],
                "--out",
                str(tmp_path / "ft"),
                *FAST,
                "--no-floor",
                *flags,
            ]
        )
        == 0
    )
    assert distill(setup, tiny_model, tmp_path / "d", "--alpha", "1", *flags) == 0
    plain, distilled = log(tmp_path / "ft"), log(tmp_path / "d")
    assert len(plain) == len(distilled) >= 6
    assert [r["loss"] for r in distilled] == pytest.approx([r["loss"] for r in plain], abs=1e-6)
    assert [r["accuracy"] for r in log(tmp_path / "d", "valid")] == [
        r["accuracy"] for r in log(tmp_path / "ft", "valid")
    ]


def test_kl_goes_down_cache_is_reused_and_the_student_is_a_classifier(setup, tiny_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "d"
    flags = [
        "--alpha",
        "0",
        "--temperature",
        "2",
        "--unlabeled",
        setup["unlabeled"],
        "--test",
        setup["test"],
        "--epochs",
        "6",
        "--logging-freq",
        "2",
        "--learning-rate",
        "3e-3",
        "--plain",
    ]
    assert distill(setup, tiny_model, out, *flags) == 0
    kl = [r["kl"] for r in log(out)]
    assert kl[-1] < 0.5 * kl[0]  # pure soft targets: the student moves towards the teacher
    result = json.loads((out / "distill.json").read_text())
    assert set(result["models"]) == {"teacher", "student", "plain", "floor"} and result["unlabeled_rows"] == 30
    assert result["speed_texts_per_s"]["teacher"] > 0 and result["speedup"] > 0
    assert "| student |" in (out / "distill.md").read_text()
    # the paired test compares the two students' per-row correctness on the same test rows
    (run,) = result["runs"]
    assert result["student_vs_plain"]["difference"] == pytest.approx(
        run["student"]["test"]["accuracy"] - run["plain"]["test"]["accuracy"]
    )
    assert result["student_vs_plain"]["rows"] == 15
    # and the student against the floor fitted on the same rows, both tests Holm-corrected
    floor = json.loads((out / "floor" / "metrics.json").read_text())
    assert result["models"]["floor"]["mean"] == floor["test"]["accuracy"]
    assert result["student_vs_floor"]["difference"] == pytest.approx(
        run["student"]["test"]["accuracy"] - floor["test"]["accuracy"]
    )
    for name in ("plain", "floor"):
        t = result[f"student_vs_{name}"]
        assert t["p_value"] <= t["p_holm"] <= min(1.0, 2 * t["p_value"]) + 1e-12
    text = (out / "distill.md").read_text()
    assert (
        "Distilled student vs the plainly fine-tuned student" in text
        and "Distilled student vs the classical floor" in text
    )
    # the student is a normal classifier folder
    assert main(["evaluate", "--model", str(out), "--data", setup["test"], "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["accuracy"] == pytest.approx(result["runs"][0]["student"]["test"]["accuracy"])
    # a rerun reuses the cached teacher outputs: the teacher is not loaded, the cache not rewritten
    (cache,) = (out / "teacher_cache").glob("*.npz")
    stamp = cache.stat().st_mtime_ns
    capsys.readouterr()

    def no_teacher(path):
        raise AssertionError("the teacher was loaded again")

    monkeypatch.setattr("domainlm.distill.command.load_teacher", no_teacher)
    assert distill(setup, tiny_model, out, *flags, "--overwrite", "--epochs", "1") == 0
    assert "teacher outputs: reused" in capsys.readouterr().err
    assert cache.stat().st_mtime_ns == stamp and len(list((out / "teacher_cache").glob("*.npz"))) == 1


def test_bad_inputs_name_the_flag(setup, tiny_model, tmp_path, capsys):
    def error(*flags, train=None):
        args = [
            "distill",
            "--teacher",
            setup["teacher"],
            "--student",
            tiny_model,
            "--train",
            train or setup["train"],
            "--out",
            str(tmp_path / "o"),
            "--max-seq-len",
            "64",
            *flags,
        ]
        assert main(args) == 2
        return capsys.readouterr().err

    other = write_jsonl(
        tmp_path / "other.jsonl", [{"text": "好的", "label": "sports"}, {"text": "不好", "label": "hotel"}]
    )
    assert "has labels ['sports'] it does not know" in error(train=other) and "--teacher" in error(train=other)
    assert f"--unlabeled {tmp_path / 'missing.txt'} does not exist" in error(
        "--unlabeled", str(tmp_path / "missing.txt")
    )
    assert "--temperature = 0.0 is out of range" in error("--temperature", "0")
    assert "--temperature = -1.0 is out of range" in error("--temperature", "-1")
    assert "--alpha = 1.5 is out of range" in error("--alpha", "1.5")
    assert "--teacher" in error("--teacher", str(tmp_path / "nowhere"))
    assert not (tmp_path / "o").exists()


def test_corpus_documents_as_unlabelled_text(corpus_dir):
    from domainlm.distill.teacher import corpus_texts
    from tests.conftest import ZH_DOCS

    texts = corpus_texts(corpus_dir, limit=5)
    assert len(texts) == 5 and all(" " not in t for t in texts)  # Chinese words joined without spaces
    sentences = {s for d in ZH_DOCS for s in d.replace("！", "。").replace("；", "。").split("。") if s}
    assert any(s in texts[0] for s in sentences)  # decoded back to the documents' own sentences


def test_hidden_state_matching_through_a_projection(setup, tiny_model, tmp_path, capsys):
    out = tmp_path / "h"
    assert (
        distill(
            setup,
            tiny_model,
            out,
            "--hidden-weight",
            "1",
            "--alpha",
            "0.5",
            "--epochs",
            "6",
            "--logging-freq",
            "2",
            "--learning-rate",
            "3e-3",
        )
        == 0
    )
    mse = [r["hidden_mse"] for r in log(out)]
    assert mse[-1] < 0.5 * mse[0]  # the projected student [CLS] state approaches the teacher's
    # the projection trains with the student and is not part of the saved classifier
    assert main(["evaluate", "--model", str(out), "--data", setup["train"], "--out", str(tmp_path / "ev")]) == 0
    floor = tmp_path / "floor"
    assert main(["finetune", "--method", "linear", "--train", setup["train"], "--out", str(floor)]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(floor),
                "--student",
                tiny_model,
                "--train",
                setup["train"],
                "--out",
                str(tmp_path / "x"),
                "--hidden-weight",
                "1",
                "--max-seq-len",
                "64",
            ]
        )
        == 2
    )
    assert "--hidden-weight needs a PyTorch teacher" in capsys.readouterr().err
