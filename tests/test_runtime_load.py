"""`classify.runtime.load`: one loader for every model kind, the device it runs on, and the settings saved with a
classifier (max_seq_len, text column, task) as the defaults of evaluate, predict, serve and export."""

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from domainlm.classify.runtime import autocast_dtype, load
from domainlm.classify.runtime_options import torch_precision
from domainlm.cli import main
from domainlm.errors import DomainLMError
from domainlm.serve.config import ServeConfig
from domainlm.serve.server import build
from tests.test_classify import make_rows, write_jsonl


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, tiny_model, tokenizer):
    """A classifier folder as finetune saves one (not trained: the tests here need its kind, not its answers)."""
    from domainlm.classify.model import load_classifier, save_classifier

    root = tmp_path_factory.mktemp("untrained")
    labels = ["book", "hotel", "pc"]
    save_classifier(load_classifier(tiny_model, labels, False, "full", 16, 32), tokenizer, root, labels, False)
    return root


def test_device_cpu_is_honoured_and_cuda_without_a_gpu_is_a_one_line_error(untrained, monkeypatch, tmp_path, capsys):
    rt = load(str(untrained), device="cpu", precision="fp32")
    assert rt.device == "cpu" and next(rt.model.parameters()).device.type == "cpu" and rt.kind == "pytorch-fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load(str(untrained)).device == "cpu"  # auto, with no GPU
    with pytest.raises(DomainLMError, match="--device cuda: PyTorch sees no CUDA GPU"):
        load(str(untrained), device="cuda")
    data = write_jsonl(tmp_path / "in.jsonl", make_rows(1, 1))
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                "--model",
                str(untrained),
                "--input",
                data,
                "--out",
                str(tmp_path / "p.jsonl"),
                "--device",
                "cuda",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "--device cuda" in err and "--device cpu" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p.jsonl").exists()


def test_precision_follows_the_rule_of_training_on_the_cpu_and_the_gpu():
    # a CPU: auto is bf16 where it has native bf16 (the rule of domainlm.precision), fp32 elsewhere
    assert torch_precision("auto", "cpu", cpu_feature=None) == (
        "fp32",
        "this CPU has no native bf16 (AVX512_BF16 or AMX)",
    )
    assert torch_precision("auto", "cpu", cpu_feature="AVX512_BF16") == ("bf16", "this CPU has AVX512_BF16")
    assert torch_precision("auto", "cpu", cpu_feature="AMX") == ("bf16", "this CPU has AMX")
    assert torch_precision("bf16", "cpu", cpu_feature=None) == ("bf16", "as asked")  # slow there, but asked for
    assert torch_precision("fp32", "cpu", cpu_feature="AMX") == torch_precision("no", "cpu") == ("fp32", "as asked")
    with pytest.raises(
        DomainLMError,
        match=r"^--precision fp16 runs on a GPU only \(--device cuda\); on the CPU use "
        r"fp32, bf16 or auto$",
    ):
        torch_precision("fp16", "cpu")
    # a GPU: bf16 where it has it; bf16 asked of one without it runs fp16
    assert torch_precision("auto", "cuda", gpu_bf16=True) == ("bf16", "the GPU has bf16")
    assert torch_precision("auto", "cuda", gpu_bf16=False) == ("fp32", "the GPU has no bf16")
    assert torch_precision("bf16", "cuda", gpu_bf16=False)[0] == "fp16"
    assert torch_precision("fp16", "cuda", gpu_bf16=True)[0] == "fp16"
    assert torch_precision("fp32", "cuda", gpu_bf16=True)[0] == "fp32"
    assert [autocast_dtype(p) for p in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]


def test_the_runtime_runs_and_says_the_precision_auto_resolves_to(untrained, monkeypatch, capsys):
    from domainlm import precision

    monkeypatch.setattr(precision, "_SAID", set())
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: None)
    rt = load(str(untrained), device="cpu")
    assert (rt.kind, rt.options.precision, rt.autocast) == ("pytorch-fp32", "fp32", None)
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: "AVX512_BF16")
    rt = load(str(untrained), device="cpu")
    assert (rt.kind, rt.options.precision, rt.autocast) == ("pytorch-bf16", "bf16", torch.bfloat16)
    load(str(untrained), device="cpu")  # said once per process
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("precision")] == [
        "precision fp32 (this CPU has no native bf16 (AVX512_BF16 or AMX))",
        "precision bf16 (this CPU has AVX512_BF16)",
    ]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the runtime's autocast makes of its last layer
        assert rt.model.classifier(torch.zeros(1, rt.config.hidden_size)).dtype == torch.bfloat16
    assert rt.predict(["a text"]).dtype == np.float32  # probabilities are fp32 whatever ran


@pytest.fixture(scope="module")
def long_model(tmp_path_factory, tokenizer):
    """A tiny encoder with 300 positions, fine-tuned at --max-seq-len 256 on long texts in a column `body` (barely:
    what counts here is the length it was trained at, and that its scores vary with what it reads)."""
    from transformers import BertConfig, BertForPreTraining

    root = tmp_path_factory.mktemp("long")
    torch.manual_seed(0)
    base = root / "base"
    BertForPreTraining(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=300,
            initializer_range=1.0,
        )
    ).save_pretrained(base)  # large weights: scores vary by text
    tokenizer.save_pretrained(base)
    # the same 140 filler tokens first, the topic after them: at 128 tokens every row looks alike, at 256 they differ
    rows = [{"body": "的很是了也都和在" * 17 + r["text"] * 4, "label": r["label"]} for r in make_rows(6, 1)]
    train = write_jsonl(root / "train.jsonl", rows)
    assert (
        main(
            [
                "finetune",
                "--model",
                str(base),
                "--train",
                train,
                "--out",
                str(root / "ft"),
                "--epochs",
                "1",
                "--batch-size",
                "6",
                "--learning-rate",
                "1e-5",
                "--max-seq-len",
                "256",
                "--text-column",
                "body",
                "--no-floor",
            ]
        )
        == 0
    )
    return root


def test_a_model_fine_tuned_at_256_is_used_at_256_without_the_flag(long_model, tmp_path, capsys):
    ft = long_model / "ft"
    saved = json.loads((ft / "model" / "domainlm_labels.json").read_text())
    assert saved["max_seq_len"] == 256 and saved["text_column"] == "body" and saved["task"] == "multiclass"
    rt = load(str(ft))
    assert rt.max_seq_len == 256
    texts = [json.loads(line)["body"] for line in (long_model / "train.jsonl").read_text().splitlines()]
    at_256, at_128 = rt.predict(texts, max_seq_len=256), rt.predict(texts, max_seq_len=128)
    assert np.ptp(at_128, axis=0).max() < 1e-6 and np.ptp(at_256, axis=0).max() > 1e-3  # the length shows

    def scores(path):
        return np.array(
            [[row["scores"][label] for label in rt.labels] for row in map(json.loads, path.read_text().splitlines())]
        )

    # predict and evaluate read the column `body` and use 256, both saved with the model
    assert (
        main(
            [
                "predict",
                "--model",
                str(ft),
                "--input",
                str(long_model / "train.jsonl"),
                "--out",
                str(tmp_path / "p.jsonl"),
                "--top-k",
                "3",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(scores(tmp_path / "p.jsonl"), at_256, atol=1e-4)
    assert (
        main(["evaluate", "--model", str(ft), "--data", str(long_model / "train.jsonl"), "--out", str(tmp_path / "ev")])
        == 0
    )
    ev = [json.loads(line) for line in (tmp_path / "ev" / "eval_predictions.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([[r["scores"][label] for label in rt.labels] for r in ev], at_256, atol=1e-4)
    # a flag still overrides it; one over the model's positions is capped with a notice naming both numbers
    assert (
        main(
            [
                "predict",
                "--model",
                str(ft),
                "--input",
                str(long_model / "train.jsonl"),
                "--out",
                str(tmp_path / "q.jsonl"),
                "--top-k",
                "3",
                "--max-seq-len",
                "128",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(scores(tmp_path / "q.jsonl"), at_128, atol=1e-4)
    capsys.readouterr()
    assert load(str(ft), max_seq_len=4096).max_seq_len == 300
    assert "--max-seq-len 4096 is more than" in capsys.readouterr().err
    # serve: the same length without the flag, the same answers
    cfg, app = build(ServeConfig(model=str(ft)))
    assert app.state.runtime.max_seq_len == 256
    with TestClient(app) as client:
        answer = client.post("/predict", json={"text": texts[:3], "top_k": 3}).json()
    got = [[{d["label"]: d["score"] for d in p["top_k"]}[label] for label in rt.labels] for p in answer["predictions"]]
    np.testing.assert_allclose(got, at_256[:3], atol=1e-5)


def test_serve_serves_a_linear_floor(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(20, 1))
    test = write_jsonl(tmp_path / "test.jsonl", make_rows(5, 2))
    assert main(["finetune", "--method", "linear", "--train", train, "--out", str(tmp_path / "floor")]) == 0
    assert (
        main(["predict", "--model", str(tmp_path / "floor"), "--input", test, "--out", str(tmp_path / "p.jsonl")]) == 0
    )
    expected = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    cfg, app = build(ServeConfig(model=str(tmp_path / "floor")))
    texts = [row["text"] for row in expected]
    with TestClient(app) as client:
        assert client.get("/health").json()["model"] == "linear"
        assert client.get("/labels").json()["labels"] == ["book", "hotel", "pc"]
        answer = client.post("/predict", json={"text": texts}).json()
        paired = client.post("/predict", json={"text": texts[:2], "text_pair": ["酒店", "电脑"]}).json()
    assert answer["model"] == "linear"
    assert [p["labels"] for p in answer["predictions"]] == [row["labels"] for row in expected]
    for p, row in zip(answer["predictions"], expected):
        assert {d["label"]: d["score"] for d in p["top_k"]} == pytest.approx(row["scores"], abs=1e-4)
    assert len(paired["predictions"]) == 2


def test_an_export_keeps_the_settings_of_the_model(long_model, tmp_path):
    from domainlm.serve.config import ExportConfig
    from domainlm.serve.export import export

    info = export(ExportConfig(model=str(long_model / "ft"), out=str(tmp_path / "onnx"), optimize=False))
    assert info["max_seq_len"] == 256  # no --max-seq-len: the length the model was fine-tuned at
    rt = load(str(tmp_path / "onnx"))
    assert (rt.kind, rt.max_seq_len, rt.text_column, rt.task) == ("onnx-fp32", 256, "body", "multiclass")
    assert (
        export(
            ExportConfig(
                model=str(long_model / "ft"), out=str(tmp_path / "onnx"), optimize=False, max_seq_len=64, overwrite=True
            )
        )["max_seq_len"]
        == 64
    )  # the flag overrides it
    assert load(str(tmp_path / "onnx")).max_seq_len == 64
