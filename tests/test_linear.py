"""The classical floor: selection on dev, exact scores after save/load, `--method linear`, and the floor beside
a fine-tuned transformer."""

import json

import numpy as np
import pytest

from domainlm.classify import linear
from domainlm.classify.data import Columns, read_examples
from domainlm.cli import main
from tests.test_classify import make_rows, write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lin")
    return {
        "train": write_jsonl(root / "train.jsonl", make_rows(40, 1)),
        "dev": write_jsonl(root / "dev.jsonl", make_rows(10, 5)),
        "test": write_jsonl(root / "test.jsonl", make_rows(15, 2)),
        "ml": write_jsonl(root / "ml.jsonl", make_rows(40, 3, multilabel=True)),
    }


def test_binary_scores_equal_scikit_learn_and_survive_save_load(tmp_path, files):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    rows = [r for r in make_rows(30, 1) if r["label"] != "pc"]
    data = read_examples(write_jsonl(tmp_path / "bin.jsonl", rows), Columns(), False)
    model = linear.fit(data, data, ["book", "hotel"], False, "accuracy")
    assert len(model.selection) == 12 and {c["classifier"] for c in model.selection} == {"logreg", "svm"}
    vec = TfidfVectorizer(analyzer=model.analyzer, ngram_range=model.ngram_range, sublinear_tf=True)
    x = vec.fit_transform(linear.texts(data))
    if model.classifier == "logreg":  # the one-vector binary model, spread over two labels, is the same model
        reference = LogisticRegression(C=model.C, max_iter=2000).fit(x, [ex.labels[0] for ex in data.examples])
        np.testing.assert_allclose(model.scores(data), reference.predict_proba(x), atol=1e-6)
    linear.save(model, tmp_path / "m")
    again = linear.load(tmp_path / "m")
    np.testing.assert_array_equal(again.scores(data), model.scores(data))
    (tmp_path / "m" / "linear.npz").write_bytes(b"not an npz")
    with pytest.raises(Exception, match="not a readable linear model"):
        linear.load(tmp_path / "m")


def test_method_linear_then_evaluate_and_predict(tmp_path, files, capsys):
    out = tmp_path / "lin"
    assert (
        main(
            [
                "finetune",
                "--method",
                "linear",
                "--train",
                files["train"],
                "--dev",
                files["dev"],
                "--test",
                files["test"],
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["accuracy"] > 0.9 and m["train_rows"] == 120 and "TF-IDF" in m["method"]
    meta = json.loads((out / "linear.json").read_text())
    best = max(c["dev_accuracy"] for c in meta["selection"])
    assert m["dev"]["accuracy"] == pytest.approx(best)
    assert main(["evaluate", "--model", str(out), "--data", files["test"], "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["accuracy"] == pytest.approx(
        m["test"]["accuracy"]
    )
    assert main(["predict", "--model", str(out), "--input", files["test"], "--out", str(tmp_path / "p.jsonl")]) == 0
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    gold = [json.loads(x)["label"] for x in open(files["test"], encoding="utf-8")]
    assert np.mean([p["labels"] == [g] for p, g in zip(preds, gold)]) == pytest.approx(m["test"]["accuracy"])


def test_multilabel_floor_tunes_thresholds(tmp_path, files):
    out = tmp_path / "ml"
    assert (
        main(["finetune", "--method", "linear", "--task", "multilabel", "--train", files["ml"], "--out", str(out)]) == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    thresholds = [v["threshold"] for v in m["dev"]["per_class"].values()]
    assert len(thresholds) == 3 and m["dev"]["f1_micro"] > 0.6
    assert json.loads((out / "linear.json").read_text())["thresholds"] == pytest.approx(thresholds)


def test_finetune_reports_the_floor_beside_the_model(tmp_path, tiny_model, files):
    out = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--model",
                tiny_model,
                "--train",
                files["train"],
                "--test",
                files["test"],
                "--out",
                str(out),
                "--epochs",
                "1",
                "--max-seq-len",
                "32",
                "--batch-size",
                "32",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    floor = json.loads((out / "floor" / "metrics.json").read_text())
    assert (
        m["floor"]["test"]["accuracy"] == pytest.approx(floor["test"]["accuracy"])
        and floor["train_rows"] == m["train_rows"] == 96
    )
    assert "Classical floor (char" in (out / "report.md").read_text()
    assert (out / "floor" / "linear.json").is_file()


def test_bad_options_are_rejected_before_any_work(tmp_path, files, tiny_model, capsys):
    assert main(["finetune", "--train", files["train"], "--out", str(tmp_path / "x")]) == 2
    assert "--model (only --method linear needs none)" in capsys.readouterr().err
    assert (
        main(
            [
                "finetune",
                "--model",
                tiny_model,
                "--train",
                files["train"],
                "--out",
                str(tmp_path / "x"),
                "--metric",
                "bogus",
            ]
        )
        == 2
    )
    assert "--metric 'bogus' is not computed for a multiclass task; choose one of accuracy" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_floor_per_fold_is_the_mean_of_the_folds(tmp_path, files):
    from domainlm import outputs
    from domainlm.classify.config import FinetuneConfig
    from domainlm.classify.data import kfold, split_validation
    from domainlm.classify.results import HELD_OUT, Scored

    cfg = FinetuneConfig(train=files["train"], out=str(tmp_path), model="m", folds=2)
    data = read_examples(files["train"], Columns(), False)
    runs = []
    for fit_rows, held in kfold(data, 2, 1):
        fit, dev = split_validation(fit_rows, 0.2, 0, 1)
        runs.append(Scored({}, rows={"dev": dev, HELD_OUT: held}, fit=fit))
    floor = linear.beside(cfg, runs, ["book", "hotel", "pc"], HELD_OUT, outputs.Plain(tmp_path))
    folds = [
        json.loads((tmp_path / "floor" / f"fold-{k}" / "metrics.json").read_text())[HELD_OUT]["accuracy"]
        for k in (1, 2)
    ]
    summary = floor["summary"]
    assert summary[HELD_OUT]["accuracy"] == pytest.approx(np.mean(folds)) and summary["train_rows"] == 48
    # the probabilities stay in memory for the blend, one set per fold, each on its own held-out rows
    assert [len(f.probs[HELD_OUT]) for f in floor["runs"]] == [len(r.rows[HELD_OUT]) for r in runs]
