"""`finetune --blend`: the weight of model and floor chosen on dev or out-of-fold rows, never on test."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from domainlm.classify import blend
from domainlm.classify.data import Dataset, Example
from domainlm.classify.runtime import load
from domainlm.cli import main
from tests.test_classify import FAST, make_rows, write_jsonl

CFG = SimpleNamespace(multilabel=False, tolerant_k=2, best_metric="accuracy", ordinal=False)


def rows(golds: list[int]) -> Dataset:
    return Dataset("x", [Example(f"t{i}", ["ab"[g]], line=i + 1) for i, g in enumerate(golds)])


def test_the_weight_is_chosen_without_the_test_rows():
    # dev: the model is right and the floor wrong on every row; test (3x as many rows): the other way round.
    # Chosen on dev the weight is 1; any test row in the choice would pull it below 0.5.
    right, wrong = np.array([[0.8, 0.2]]), np.array([[0.3, 0.7]])
    dev, test = rows([0] * 10), rows([0] * 30)
    selection = (np.repeat(right, 10, 0), np.repeat(wrong, 10, 0), dev)
    t = (np.repeat(wrong, 30, 0), np.repeat(right, 30, 0), test)
    result = blend.blend(CFG, selection, "dev", ["a", "b"], t)
    assert result["weight"] == 1.0 and result["dev"]["accuracy"] == 1.0
    assert result["test"]["accuracy"] == 0.0  # the test rows pay for the dev choice: nothing was tuned on them
    assert result["test_parts"]["model"]["accuracy"] == 0.0 and result["test_parts"]["floor"]["accuracy"] == 1.0
    # a mix that helps: each part right on half the rows, confident where right, unsure where wrong
    model = np.array([[0.9, 0.1]] * 5 + [[0.45, 0.55]] * 5)
    floor = np.array([[0.45, 0.55]] * 5 + [[0.9, 0.1]] * 5)
    w, values = blend.choose_weight(model, floor, rows([0] * 10), ["a", "b"], CFG)
    assert values[1.0] == values[0.0] == 0.5 and values[w] == 1.0 and 0 < w < 1


def test_finetune_blend_single_run_and_folds(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(14, 1))
    test = write_jsonl(tmp_path / "test.jsonl", make_rows(6, 2))
    out = tmp_path / "one"
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
                "--epochs",
                "2",
                "--blend",
            ]
        )
        == 0
    )
    result = json.loads((out / "blend.json").read_text())
    assert result["chosen_on"] == "dev" and json.loads((out / "metrics.json").read_text())["blend"] == result
    assert "Blend" in (out / "report.md").read_text()
    # the same weight from the dev rows alone, and the test rows scored with it
    dev = [json.loads(x) for x in (out / "dev_predictions.jsonl").read_text().splitlines()]
    dev_rows = Dataset("dev", [Example(d["text"], d["gold"], line=d["line"]) for d in dev])
    model, floor = load(str(out)), load(str(out / "floor"))
    cfg = SimpleNamespace(**vars(CFG))
    w, _ = blend.choose_weight(
        model.predict(*dev_rows.columns(), max_seq_len=32),
        floor.predict(*dev_rows.columns()),
        dev_rows,
        model.labels,
        cfg,
    )
    assert result["weight"] == w and result["selection_rows"] == len(dev)
    texts = [json.loads(x)["text"] for x in open(test, encoding="utf-8")]
    gold = [json.loads(x)["label"] for x in open(test, encoding="utf-8")]
    probs = w * model.predict(texts, max_seq_len=32) + (1 - w) * floor.predict(texts)
    assert result["test"]["accuracy"] == pytest.approx(
        np.mean([model.labels[j] == g for j, g in zip(probs.argmax(1), gold)])
    )
    # folds: chosen on the out-of-fold rows (every training row)
    out = tmp_path / "cv"
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
                "2",
                "--epochs",
                "1",
                "--blend",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["blend"]["chosen_on"] == "oof" and summary["blend"]["selection_rows"] == 42
    assert "test" in summary["blend"] and "Blend" in (out / "summary.md").read_text()


def test_blend_bad_options(tmp_path, tiny_model, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(5, 1))
    assert (
        main(
            ["finetune", "--model", tiny_model, "--train", train, "--out", str(tmp_path / "o"), "--blend", "--no-floor"]
        )
        == 2
    )
    assert "--blend mixes the transformer with the floor: it needs --floor" in capsys.readouterr().err
    assert (
        main(
            [
                "finetune",
                "--model",
                tiny_model,
                "--train",
                train,
                "--out",
                str(tmp_path / "o"),
                "--blend",
                "--seeds",
                "1,2",
            ]
        )
        == 2
    )
    assert "--blend takes one seed (or --folds)" in capsys.readouterr().err
