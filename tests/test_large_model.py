"""Fine-tuning at a large model's settings: any HF encoder (MegatronBert), the optimizer options, gradient
checkpointing, layer-wise learning-rate decay, ordinal metrics."""

import json

import numpy as np
import pytest
import torch

from domainlm.classify import metrics as M
from domainlm.cli import main
from domainlm.train.setup import build_optimizer, layer_depths
from tests.test_classify import FAST, make_rows, write_jsonl


def save_tiny_megatron(out, tokenizer) -> str:
    """A 2-layer, 32-wide MegatronBert (pre-LayerNorm BERT, the architecture of Erlangshen-MegatronBert-1.3B)."""
    from transformers import MegatronBertConfig, MegatronBertForPreTraining

    torch.manual_seed(0)
    config = MegatronBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    MegatronBertForPreTraining(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def megatron(tmp_path_factory, tokenizer):
    return save_tiny_megatron(tmp_path_factory.mktemp("megatron"), tokenizer)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return {
        "train": write_jsonl(root / "train.jsonl", make_rows(20, 1)),
        "test": write_jsonl(root / "test.jsonl", make_rows(8, 2)),
    }


def test_megatron_with_the_large_model_preset_trains_reloads_evaluates_and_exports(
    tmp_path, megatron, rows, monkeypatch
):
    import yaml

    import domainlm.classify.command as command

    built = []

    def spy(model, *args, **kwargs):  # the real optimizer, kept with the model it was built on
        built.append((model, build_optimizer(model, *args, **kwargs)))
        return built[-1][1]

    monkeypatch.setattr(command, "build_optimizer", spy)
    out = tmp_path / "ft"
    # the preset's values, except the ones a 60-row CPU test cannot take (length, batch, rate, bf16, eval cadence)
    assert (
        main(
            [
                "finetune",
                "--model",
                megatron,
                "--train",
                rows["train"],
                "--test",
                rows["test"],
                "--out",
                str(out),
                "--preset",
                "large-model",
                "--max-seq-len",
                "32",
                "--batch-size",
                "8",
                "--learning-rate",
                "2e-3",
                "--epochs",
                "3",
                "--precision",
                "fp32",
                "--eval-steps",
                "0",
                "--valid-ratio",
                "0.2",
                "--layer-lr-decay",
                "0.5",
                "--gradient-checkpointing",
            ]
        )
        == 0
    )
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["adam_beta2"], resolved["weight_decay"], resolved["lr_decay"], resolved["warmup_ratio"]) == (
        0.98,
        0.1,
        "cosine",
        0.01,
    )
    # the options reach the optimizer: betas, epsilon, weight decay, and each layer's rate (2 layers, decay 0.5)
    ((model, optimizer),) = built
    groups = optimizer.param_groups
    assert {g["betas"] for g in groups} == {(0.9, 0.98)} and {g["eps"] for g in groups} == {1e-8}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.1}
    rate = {id(p): g["initial_lr"] for g in groups for p in g["params"]}
    rates = {name: rate[id(p)] for name, p in model.named_parameters()}
    assert (
        rates["hf.classifier.weight"]
        == rates["hf.bert.pooler.dense.bias"]
        == rates["hf.bert.encoder.ln.weight"]
        == 2e-3
    )
    assert rates["hf.bert.encoder.layer.1.attention.self.query.weight"] == pytest.approx(2e-3 * 0.5)
    assert rates["hf.bert.encoder.layer.0.output.dense.bias"] == pytest.approx(2e-3 * 0.25)
    assert rates["hf.bert.embeddings.word_embeddings.weight"] == pytest.approx(2e-3 * 0.125)
    assert model.hf.bert.encoder.gradient_checkpointing
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.5  # majority: 1/3
    # reloaded by evaluate: the same numbers
    assert main(["evaluate", "--model", str(out), "--data", rows["test"], "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    # exported to ONNX, verified against PyTorch by export itself
    assert main(["export", str(out), "--out", str(tmp_path / "onnx")]) == 0
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["model_type"] == "megatron-bert"


def train_losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["split"] == "train"]


@pytest.mark.parametrize("kind", ["bert", "megatron"])
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_model, megatron, rows, kind):
    model = (
        tiny_model if kind == "bert" else megatron
    )  # BERT runs its [CLS]-only last layer; MegatronBert its own forward
    runs = []
    for flags in ([], ["--gradient-checkpointing"]):
        out = tmp_path / f"run{len(runs)}"
        assert (
            main(
                [
                    "finetune",
                    "--model",
                    model,
                    "--train",
                    rows["train"],
                    "--out",
                    str(out),
                    *FAST,
                    "--epochs",
                    "2",
                    "--batch-size",
                    "8",
                    "--logging-freq",
                    "1",
                    "--precision",
                    "fp32",
                    "--no-floor",
                    *flags,
                ]
            )
            == 0
        )
        runs.append(train_losses(out))
    assert len(runs[0]) >= 8 and runs[0][0] != runs[0][-1]  # steps that trained (dropout on, weights moving)
    assert runs[1] == pytest.approx(runs[0], abs=1e-5)


def test_layer_depths_and_rates_by_hand(tiny_model):
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    depths = layer_depths(hf)
    assert (
        depths["bert.embeddings.LayerNorm.weight"] == 3 and depths["bert.encoder.layer.0.attention.self.key.bias"] == 2
    )
    assert depths["bert.encoder.layer.1.output.dense.weight"] == 1 and depths["classifier.bias"] == 0
    optimizer = build_optimizer(hf, 1e-3, 0.01, (0.8, 0.9), 1e-6, layer_decay=0.9)
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in hf.named_parameters():
        assert lr[id(p)] == pytest.approx(1e-3 * 0.9 ** depths[name]), name
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the logged rate is the head's, the peak
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in optimizer.param_groups)
    plain = build_optimizer(hf, 1e-3, 0.01)
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


def test_ordinal_metrics_by_hand_and_through_finetune(tmp_path, tiny_model, capsys):
    labels = ["1", "2", "3", "4"]
    scores = np.eye(4)[[0, 2, 3, 1, 1]]  # predicted classes 0, 2, 3, 1, 1
    gold = np.array([0, 1, 1, 1, 3])  # distances 0, 1, 2, 0, 2
    m = M.multiclass_metrics(scores, gold, labels, ordinal=True)
    assert m["mae_classes"] == pytest.approx(1.0) and m["accuracy_within_1"] == pytest.approx(0.6)
    assert "mae_classes" not in M.multiclass_metrics(scores, gold, labels)
    # numeric labels are ordered by value, not as text ("10" after "9")
    data = [{"text": r["text"], "label": {"hotel": "2", "book": "9", "pc": "10"}[r["label"]]} for r in make_rows(10, 5)]
    train = write_jsonl(tmp_path / "ord.jsonl", data)
    out = tmp_path / "ord"
    assert (
        main(
            [
                "finetune",
                "--model",
                tiny_model,
                "--train",
                train,
                "--out",
                str(out),
                *FAST,
                "--epochs",
                "1",
                "--ordinal",
                "--no-floor",
            ]
        )
        == 0
    )
    assert json.loads((out / "model" / "domainlm_labels.json").read_text())["labels"] == ["2", "9", "10"]
    dev = json.loads((out / "metrics.json").read_text())["dev"]
    assert 0 <= dev["accuracy_within_1"] <= 1 and dev["mae_classes"] >= 0
    assert dev["accuracy_within_1"] >= dev["accuracy"]
    capsys.readouterr()
    words = write_jsonl(tmp_path / "w.jsonl", make_rows(5, 6))
    assert main(["finetune", "--model", tiny_model, "--train", words, "--out", str(tmp_path / "w"), "--ordinal"]) == 2
    assert (
        "--ordinal: the labels (book, hotel, pc) are not numbers; give their order with --labels"
        in capsys.readouterr().err
    )
    assert main(["evaluate", "--model", str(out), "--data", train, "--out", str(tmp_path / "ev"), "--ordinal"]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["accuracy_within_1"] >= ev["accuracy"] and "mae_classes" in ev
