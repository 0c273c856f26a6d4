"""Classification data, metrics, and `finetune | evaluate | predict` through the real CLI."""

import io
import json
import random

import numpy as np
import pytest

from domainlm.classify import metrics as M
from domainlm.classify.data import Columns, Dataset, Example, kfold, read_examples, split_validation
from domainlm.cli import main
from domainlm.errors import DomainLMError

CLASSES = {"hotel": "酒店服务房间早餐入住交通", "book": "书内容作者观点推荐朋友", "pc": "电脑性能屏幕电池键盘手感"}
FILLER = "的很是了也都和在"


def make_rows(n_per_class: int, seed: int, multilabel: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, chars in CLASSES.items():
        for _ in range(n_per_class):
            text = "".join(rng.choice(chars) for _ in range(6)) + "".join(rng.choice(FILLER) for _ in range(4))
            labels = [label]
            if multilabel and rng.random() < 0.3:  # a second topic mixed in
                other = rng.choice([c for c in CLASSES if c != label])
                text += "".join(rng.choice(CLASSES[other]) for _ in range(6))
                labels.append(other)
            rows.append(
                {
                    "text": "".join(rng.sample(text, len(text))),
                    "label": labels if multilabel else label,
                    "group": rng.choice(["成本数据", "质量验收"]),
                }
            )
    rng.shuffle(rows)
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    return {
        "train": write_jsonl(root / "train.jsonl", make_rows(40, 1)),
        "test": write_jsonl(root / "test.jsonl", make_rows(15, 2)),
        "root": root,
    }


FAST = [
    "--batch-size",
    "16",
    "--learning-rate",
    "2e-3",
    "--max-seq-len",
    "32",
    "--warmup-ratio",
    "0.05",
    "--logging-freq",
    "5",
    "--precision",
    "fp32",
]


def finetune(model, train, out, *flags):
    return main(["finetune", "--model", model, "--train", train, "--out", str(out), *FAST, *flags])


# ---- metrics against hand-computed values --------------------------------------------------------------


def test_multiclass_metrics_by_hand():
    labels = ["a", "b", "c"]
    scores = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.3, 0.6], [0.5, 0.1, 0.4]])
    gold = np.array([0, 0, 2, 2])
    m = M.multiclass_metrics(scores, gold, labels, tolerant_k=2, groups=["x", "x", "y", "y"])
    assert m["accuracy"] == 0.5
    assert m["tolerant_accuracy@2"] == 1.0  # row 2: gold a is 2nd; row 4: gold c is 2nd
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == 0.0 and m["per_class"]["c"]["recall"] == 0.5
    assert m["f1_macro"] == pytest.approx((0.5 + 0 + 2 / 3) / 3)
    assert m["f1_micro"] == 0.5
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 0, 0], [1, 0, 1]]
    assert m["per_group"] == {
        "x": {"n": 2, "accuracy": 0.5, "tolerant_accuracy@2": 1.0},
        "y": {"n": 2, "accuracy": 0.5, "tolerant_accuracy@2": 1.0},
    }
    assert M.topk_accuracy(scores, gold, 1) == 0.5


def test_multilabel_metrics_thresholds_and_aggregate():
    labels = ["a", "b"]
    probs = np.array([[0.9, 0.6], [0.2, 0.4], [0.7, 0.1]])
    gold = np.array([[1, 1], [0, 1], [1, 0]])
    m = M.multilabel_metrics(probs, gold, labels, np.array([0.5, 0.5]))
    assert m["subset_accuracy"] == pytest.approx(2 / 3) and m["hamming_loss"] == pytest.approx(1 / 6)
    assert m["tolerant_accuracy"] == pytest.approx(2 / 3)  # row 2 predicts nothing: no overlap
    t = M.tune_thresholds(probs, gold)
    assert t[1] <= 0.4  # the threshold for b drops to catch row 2
    assert M.multilabel_metrics(probs, gold, labels, t)["subset_accuracy"] == 1.0
    agg = M.aggregate([{"accuracy": 0.8, "n": 3}, {"accuracy": 0.6, "n": 3}])
    assert agg == {"accuracy": {"mean": pytest.approx(0.7), "std": pytest.approx(0.1414, abs=1e-4)}}


# ---- data ---------------------------------------------------------------------------------------------------


def test_validation_split_ratio_cap_stratified_and_kfold():
    ds = Dataset("d", [Example(f"t{i}", ["a" if i % 4 else "b"]) for i in range(400)])
    train, valid = split_validation(ds, 0.1, cap=1000, seed=0)
    assert len(valid) == 40 and len(train) == 360
    assert sum(ex.labels == ["b"] for ex in valid.examples) == 10  # b is a quarter of the data
    assert len(split_validation(ds, 0.5, cap=100, seed=0)[1]) == 100
    with pytest.raises(DomainLMError, match=r"out of range \[0.01, 0.5\]"):
        split_validation(ds, 0.6, cap=100, seed=0)
    lonely = Dataset("d.jsonl", [Example(f"t{i}", ["a"]) for i in range(9)] + [Example("x", ["rare"])])
    with pytest.raises(DomainLMError, match=r"no training example for \['rare'\]"):
        split_validation(lonely, 0.5, cap=100, seed=0)
    folds = kfold(ds, 4, seed=0)
    assert len(folds) == 4 and sorted(ex.text for _, t in folds for ex in t.examples) == sorted(
        ex.text for ex in ds.examples
    )


def test_csv_tsv_multilabel_cells_and_bad_rows(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text('text,label\n好酒店,"hotel,book"\n书不错,"[""book""]"\n', encoding="utf-8")
    ds = read_examples(str(csv), Columns(), multilabel=True)
    assert [ex.labels for ex in ds.examples] == [["hotel", "book"], ["book"]]
    with pytest.raises(DomainLMError, match=r"d\.csv:2: several labels"):
        read_examples(str(csv), Columns(), multilabel=False)
    tsv = tmp_path / "d.tsv"
    tsv.write_text("content\ttag\n好\tA\n\tB\n", encoding="utf-8")
    with pytest.raises(DomainLMError, match=r"d\.tsv:3: empty text"):
        read_examples(str(tsv), Columns(text="content", label="tag"), multilabel=False)
    assert read_examples(str(tsv), Columns(text="content", label="tag"), False, skip_bad=True).skipped == {
        "empty text": 1
    }
    with pytest.raises(DomainLMError, match=r"d\.tsv:2: missing column\(s\) text"):
        read_examples(str(tsv), Columns(), multilabel=False)


# ---- commands -----------------------------------------------------------------------------------------------


def test_full_finetune_beats_majority_then_evaluate_and_predict(tmp_path, tiny_model, data, capsys, monkeypatch):
    out = tmp_path / "ft"
    assert (
        finetune(tiny_model, data["train"], out, "--test", data["test"], "--epochs", "8", "--group-column", "group")
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.6  # majority class: 1/3
    assert set(metrics["test"]["per_group"]) == {"成本数据", "质量验收"}
    for name in (
        "model/config.json",
        "model/domainlm_labels.json",
        "config.yaml",
        "report.md",
        "log.jsonl",
        "test_predictions.jsonl",
        "test_bad_cases.jsonl",
        "test_confusion.png",
        "dev_predictions.jsonl",
    ):
        assert (out / name).is_file(), name
    assert (out / "test_confusion.png").stat().st_size > 1000
    assert "| hotel |" in (out / "report.md").read_text()
    bad = [json.loads(x) for x in (out / "test_bad_cases.jsonl").read_text().splitlines()]
    assert all(b["gold"] != b["predicted"] for b in bad)
    assert len(bad) == round((1 - metrics["test"]["accuracy"]) * metrics["test"]["n"])
    # evaluate: same model, same data, same numbers
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(out / "model"),
                "--data",
                data["test"],
                "--out",
                str(tmp_path / "ev"),
                "--group-column",
                "group",
            ]
        )
        == 0
    )
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (
        ev["accuracy"] == pytest.approx(metrics["test"]["accuracy"]) and ev["per_group"] == metrics["test"]["per_group"]
    )
    # predict: a file, and stdin
    assert (
        main(["predict", "--model", str(out / "model"), "--input", data["test"], "--out", str(tmp_path / "p.jsonl")])
        == 0
    )
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(preds) == 45 and set(preds[0]) == {"text", "labels", "scores"}
    # finetune scores the test rows in length order and puts them back: row by row, the same as predict
    tested = [json.loads(x) for x in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert [t["text"] for t in tested] == [p["text"] for p in preds]
    assert [t["predicted"] for t in tested] == [p["labels"] for p in preds]
    for t, p in zip(tested, preds):  # at auto (bf16 where the CPU has it) a score moves in the 4th decimal with
        # the batch its text runs in (finetune's batches are not predict's); in fp32 they agree to the rounding
        assert all(t["scores"][k] == pytest.approx(v, abs=5e-4) for k, v in p["scores"].items())
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("电脑屏幕电池键盘\n酒店房间早餐\n"))
    assert main(["predict", "--model", str(out / "model")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["labels"] for x in lines] == [["pc"], ["hotel"]]


def test_lora_trains_only_adapters_and_reloads_merged(tmp_path, tiny_model, data, capsys):
    out = tmp_path / "lora"
    assert (
        finetune(
            tiny_model,
            data["train"],
            out,
            "--method",
            "lora",
            "--lora-rank",
            "8",
            "--epochs",
            "6",
            "--learning-rate",
            "1e-2",
        )
        == 0
    )
    assert "LoRA rank 8" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model" / "config.json").is_file()
    dev = json.loads((out / "metrics.json").read_text())["dev"]
    assert main(["evaluate", "--model", str(out / "model"), "--data", data["test"], "--out", str(tmp_path / "ev")]) == 0
    assert dev["n"] > 0
    assert finetune(tiny_model, data["train"], tmp_path / "x", "--method", "lora", "--lora-rank", "12") == 2
    assert "--lora-rank 12 is not allowed: choose 8, 16, 32 or 64" in capsys.readouterr().err


def test_kfold_and_seeds_aggregate_mean_and_std(tmp_path, tiny_model, data):
    out = tmp_path / "cv"
    assert (
        finetune(tiny_model, data["train"], out, "--folds", "3", "--epochs", "2", "--early-stopping-patience", "0") == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    accs = [json.loads((out / f"fold-{k}" / "metrics.json").read_text())["held_out"]["accuracy"] for k in (1, 2, 3)]
    assert summary["evaluated_on"] == "held_out" and summary["runs"] == 3  # each fold's held-out rows, not "test"
    assert summary["mean_std"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert summary["mean_std"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    out = tmp_path / "seeds"
    assert finetune(tiny_model, data["train"], out, "--seeds", "1,2", "--epochs", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["seed"] for r in summary["per_run"]] == [1, 2] and (out / "seed-2" / "model").is_dir()


def test_multilabel_finetune(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "ml.jsonl", make_rows(40, 3, multilabel=True))
    out = tmp_path / "ml"
    assert finetune(tiny_model, train, out, "--task", "multilabel", "--epochs", "6", "--valid-ratio", "0.2") == 0
    dev = json.loads((out / "metrics.json").read_text())["dev"]
    assert {"subset_accuracy", "hamming_loss", "tolerant_accuracy", "f1_micro"} <= set(dev)
    assert all("threshold" in v for v in dev["per_class"].values())
    assert dev["tolerant_accuracy"] > 0.5


def test_early_stopping_presets_and_bad_inputs(tmp_path, tiny_model, data, capsys):
    out = tmp_path / "es"
    assert (
        finetune(
            tiny_model,
            data["train"],
            out,
            "--epochs",
            "30",
            "--eval-steps",
            "2",
            "--early-stopping-patience",
            "2",
            "--learning-rate",
            "1e-9",
        )
        == 0
    )  # nothing improves: stops after 3 evaluations
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and m["best_step"] == 2
    import yaml

    assert (
        main(
            [
                "finetune",
                "--model",
                tiny_model,
                "--train",
                data["train"],
                "--out",
                str(tmp_path / "pre"),
                "--preset",
                "few-shot",
                "--epochs",
                "1",
                "--max-seq-len",
                "32",
            ]
        )
        == 0
    )
    resolved = yaml.safe_load((tmp_path / "pre" / "config.yaml").read_text())
    assert resolved["epochs"] == 1 and resolved["learning_rate"] == 5e-5 and resolved["early_stopping_patience"] == 5
    capsys.readouterr()

    def error(*args):
        assert main(list(args)) == 2
        return capsys.readouterr().err

    assert "--epochs = 51 is out of range [1, 50]" in error(
        "finetune", "--model", tiny_model, "--train", data["train"], "--out", "o", "--epochs", "51"
    )
    assert "--learning-rate = 1.0 is out of range" not in error(
        "finetune", "--model", tiny_model, "--train", data["train"], "--out", "o", "--learning-rate", "2"
    )
    assert "--learning-rate = 2.0 is out of range (0, 1]" in error(
        "finetune", "--model", tiny_model, "--train", data["train"], "--out", "o", "--learning-rate", "2"
    )
    assert "missing column(s) review" in error(
        "finetune", "--model", tiny_model, "--train", data["train"], "--out", "o", "--text-column", "review"
    )
    multi = write_jsonl(tmp_path / "multi.jsonl", make_rows(5, 4, multilabel=True))
    assert "several labels" in error("finetune", "--model", tiny_model, "--train", multi, "--out", "o")
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "好", "label": "sports"}])
    assert "dev.jsonl:1: label(s) ['sports'] never seen in training" in error(
        "finetune", "--model", tiny_model, "--train", data["train"], "--out", "o", "--dev", dev
    )
    assert "is not a sequence classifier" in error(
        "evaluate", "--model", tiny_model, "--data", data["test"], "--out", "o"
    )
    clf = tmp_path / "ft"
    assert finetune(tiny_model, data["train"], clf, "--epochs", "1") == 0
    assert "labels ['sports'] are not among the model's labels" in error(
        "evaluate", "--model", str(clf / "model"), "--data", dev, "--out", "o"
    )


def test_unpadded_finetune_trains_like_the_padded_one(tmp_path, tokenizer, data):
    """--unpad yes (the GPU default) and --unpad no, same seed, no dropout: the same losses and dev metrics."""
    from domainlm.train.logging import read_log
    from tests.conftest import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "nodrop", tokenizer, heads=False, dropout=0.0)
    logs = {}
    for mode in ("yes", "no"):
        assert (
            finetune(str(model_dir), data["train"], tmp_path / mode, "--epochs", "1", "--unpad", mode, "--no-floor")
            == 0
        )
        logs[mode] = read_log(tmp_path / mode / "log.jsonl")
    assert [(r["step"], r["split"]) for r in logs["yes"]] == [(r["step"], r["split"]) for r in logs["no"]]
    assert len(logs["yes"]) >= 3
    for a, b in zip(logs["yes"], logs["no"]):
        for key in ("loss", "accuracy", "f1_micro"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
