"""Fold ensembles: out-of-fold predictions for every training row once, the ensemble as a classifier folder
(evaluate, predict, serve's path, export), its probabilities the mean of its members'."""

import json

import numpy as np
import pytest

from domainlm.classify.runtime import load as load_runtime
from domainlm.cli import main
from tests.test_classify import FAST, make_rows, write_jsonl


@pytest.fixture(scope="module")
def cv(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("cv")
    train = write_jsonl(root / "train.jsonl", make_rows(14, 1))
    test = write_jsonl(root / "test.jsonl", make_rows(6, 2))
    out = root / "cv"
    assert (
        main(
            [
                "finetune",
                "--model",
                tiny_model,
                "--train",
                train,
                "--test",
                test,
                "--out",
                str(out),
                *FAST,
                "--folds",
                "3",
                "--epochs",
                "3",
                "--early-stopping-patience",
                "0",
                "--no-floor",
            ]
        )
        == 0
    )
    return {"root": root, "train": train, "test": test, "out": out}


def test_oof_covers_every_training_row_exactly_once(cv):
    train = [json.loads(x) for x in open(cv["train"], encoding="utf-8")]
    oof = [json.loads(x) for x in (cv["out"] / "oof.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in oof) == list(range(len(train)))
    assert [r["label"] for r in oof] == [t["label"] for t in train]
    assert {r["fold"] for r in oof} == {1, 2, 3}
    assert all(sum(r["probs"]) == pytest.approx(1, abs=1e-5) for r in oof)
    # each row's probabilities are those of the fold model that held it out
    fold1 = [r for r in oof if r["fold"] == 1]
    runtime = load_runtime(str(cv["out"] / "fold-1"), "fp32")  # as the folds trained (auto: bf16 where the CPU has it)
    probs = runtime.predict([train[r["row"]]["text"] for r in fold1], max_seq_len=32)
    np.testing.assert_allclose(probs, [r["probs"] for r in fold1], atol=1e-6)
    summary = json.loads((cv["out"] / "summary.json").read_text())
    labels = summary["labels"]
    accuracy = np.mean([labels[int(np.argmax(r["probs"]))] == r["label"] for r in oof])
    assert summary["oof"]["accuracy"] == pytest.approx(accuracy) and summary["oof"]["n"] == len(train)
    assert "Out-of-fold predictions" in (cv["out"] / "summary.md").read_text()


def test_ensemble_probabilities_are_the_mean_of_the_folds(cv, tmp_path):
    texts = [json.loads(x)["text"] for x in open(cv["test"], encoding="utf-8")]
    members = [load_runtime(str(cv["out"] / f"fold-{k}")).predict(texts, max_seq_len=32) for k in (1, 2, 3)]
    ensemble = load_runtime(str(cv["out"]))
    probs = ensemble.predict(texts, max_seq_len=32)
    np.testing.assert_allclose(probs, np.mean(members, axis=0), atol=1e-6)
    assert not np.allclose(members[0], members[1], atol=1e-3)  # the folds differ: the mean is not any one of them
    # serve's path: one encoding, each member scoring the padded batch; equal to predict's packed one in fp32 (at
    # auto, bf16 where the CPU has it, the two paths round differently: 1e-3)
    exact = load_runtime(str(cv["out"]), precision="fp32")
    batch = exact.pad(exact.encode(texts[:5], max_seq_len=32))
    np.testing.assert_allclose(exact.probs_batch(batch), exact.predict(texts[:5], max_seq_len=32), atol=1e-5)
    np.testing.assert_allclose(ensemble.probs_batch(batch), probs[:5], atol=2e-3)
    # the server's own batches: packed once for every member (PyTorch members run packed), the predict answers
    packed = exact.feed(exact.encode(texts[:5], max_seq_len=32))
    assert exact.packed and "cu_seqlens" in packed
    np.testing.assert_allclose(exact.probs_batch(packed), exact.predict(texts[:5], max_seq_len=32), atol=1e-6)
    # the reported ensemble and single-fold metrics are those of these probabilities
    summary = json.loads((cv["out"] / "summary.json").read_text())
    gold = [json.loads(x)["label"] for x in open(cv["test"], encoding="utf-8")]
    labels = summary["labels"]
    acc = lambda p: np.mean([labels[j] == g for j, g in zip(p.argmax(1), gold)])  # noqa: E731
    assert summary["test_file"]["ensemble"]["accuracy"] == pytest.approx(acc(probs))
    singles = [acc(m) for m in members]
    assert summary["test_file"]["single_folds"]["accuracy"]["mean"] == pytest.approx(np.mean(singles))
    assert summary["test_file"]["single_folds"]["accuracy"]["std"] == pytest.approx(np.std(singles, ddof=1))
    # evaluate and predict take the folder like any classifier
    assert main(["evaluate", "--model", str(cv["out"]), "--data", cv["test"], "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["accuracy"] == pytest.approx(acc(probs))
    assert main(["predict", "--model", str(cv["out"]), "--input", cv["test"], "--out", str(tmp_path / "p.jsonl")]) == 0
    predicted = [json.loads(x)["labels"][0] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert predicted == [labels[j] for j in probs.argmax(1)]


def test_export_writes_an_ensemble_of_verified_members(cv, tmp_path):
    out = tmp_path / "onnx"
    assert main(["export", str(cv["out"]), "--out", str(out)]) == 0
    assert all((out / f"fold-{k}" / "export.json").is_file() for k in (1, 2, 3))
    texts = [json.loads(x)["text"] for x in open(cv["test"], encoding="utf-8")]
    onnx = load_runtime(str(out))
    assert onnx.kind == "ensemble of 3 onnx-fp32"
    np.testing.assert_allclose(
        onnx.predict(texts, max_seq_len=32), load_runtime(str(cv["out"])).predict(texts, max_seq_len=32), atol=1e-4
    )


def test_an_ensemble_of_linear_floors_predicts_through_its_members(tmp_path):
    from domainlm.classify.runtime import EnsembleRuntime, Runtime

    train = write_jsonl(tmp_path / "train.jsonl", make_rows(10, 1))
    out = tmp_path / "cv"
    assert main(["finetune", "--method", "linear", "--train", train, "--out", str(out), "--folds", "3"]) == 0
    oof = [json.loads(x) for x in (out / "oof.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in oof) == list(range(30))
    ensemble = load_runtime(str(out))
    assert isinstance(ensemble, EnsembleRuntime) and not isinstance(ensemble, Runtime)  # no tokens: serve calls predict
    texts = [r["text"] for r in make_rows(3, 9)]
    members = [load_runtime(str(out / f"fold-{k}")).predict(texts) for k in (1, 2, 3)]
    np.testing.assert_allclose(ensemble.predict(texts), np.mean(members, axis=0), atol=1e-7)
