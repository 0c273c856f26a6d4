"""An export folder loads in Hugging Face tooling: its config.json carries the label map and task, transformers'
AutoConfig and AutoTokenizer read the folder, and model.onnx run by ONNX Runtime on that tokenizer's output gives the
exported runtime's probabilities and labels; optimum's ORTModelForSequenceClassification where optimum imports."""

import json

import numpy as np
import pytest

from domainlm.classify.runtime import load as load_runtime
from tests.test_export import exported, trained  # noqa: F401 - shared session fixtures

TEXTS = ["酒店房间早餐入住", "电脑性能屏幕电池", "书内容作者观点"]


def test_transformers_reads_the_export_and_its_onnx_model_agrees(exported):
    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer

    folder = exported[0]
    config = AutoConfig.from_pretrained(folder)
    assert config.id2label == {0: "book", 1: "hotel", 2: "pc"} and config.label2id == {"book": 0, "hotel": 1, "pc": 2}
    assert config.problem_type == "single_label_classification" and config.num_labels == 3
    assert config.architectures == ["BertForSequenceClassification"]
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert [o.name for o in session.get_outputs()] == ["logits"]  # what optimum's classes read
    feed = {
        k: v.astype(np.int64)
        for k, v in tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="np").items()
        if k in names
    }
    logits = session.run(["logits"], feed)[0]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, load_runtime(str(folder), "fp32").predict(TEXTS), atol=1e-5)
    assert [config.id2label[int(i)] for i in probs.argmax(-1)] == ["hotel", "pc", "book"]


def test_optimum_loads_the_export(exported):
    optimum = pytest.importorskip(
        "optimum.onnxruntime",
        exc_type=ImportError,
        reason="optimum[onnxruntime] does not import with this transformers",
    )
    from transformers import AutoTokenizer

    model = optimum.ORTModelForSequenceClassification.from_pretrained(exported[0], file_name="model.onnx")
    tokenizer = AutoTokenizer.from_pretrained(exported[0])
    logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    assert [model.config.id2label[int(i)] for i in logits.argmax(-1)] == ["hotel", "pc", "book"]
