"""`domainlm export`: ONNX round trip on several shapes, int8, verification errors, and export folders in
`predict` / `evaluate`."""

import json

import numpy as np
import onnx
import pytest

from domainlm.classify.runtime import OnnxRuntime, TorchRuntime
from domainlm.classify.runtime import load as load_runtime
from domainlm.cli import main
from domainlm.errors import DomainLMError
from domainlm.serve.config import ExportConfig
from domainlm.serve.export import compare, export, sample_batches
from tests.test_classify import make_rows, write_jsonl

TEXTS = [
    "酒店房间早餐",
    "电脑屏幕",
    "书的内容很好，作者的观点值得推荐给朋友们，书的内容很好，作者的观点值得推荐",
    "键盘",
    "交通方便服务周到",
    "性能电池手感" * 6,
    "入住",
    "朋友",
]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_model):
    """A tiny classifier fine-tuned to tell hotel / book / pc texts apart, and its test file."""
    root = tmp_path_factory.mktemp("trained")
    train, test = (
        write_jsonl(root / "train.jsonl", make_rows(40, 1)),
        write_jsonl(root / "test.jsonl", make_rows(15, 2)),
    )
    dev = write_jsonl(root / "dev.jsonl", make_rows(5, 3))  # every training row trains
    assert (
        main(
            [
                "finetune",
                "--model",
                tiny_model,
                "--train",
                train,
                "--dev",
                dev,
                "--out",
                str(root / "ft"),
                "--epochs",
                "12",
                "--batch-size",
                "16",
                "--learning-rate",
                "2e-3",
                "--max-seq-len",
                "32",
                "--warmup-ratio",
                "0.05",
                "--logging-freq",
                "50",
            ]
        )
        == 0
    )
    return {"ft": root / "ft", "test": test, "root": root}


@pytest.fixture(scope="session")
def exported(trained):
    out = trained["root"] / "export-int8"
    info = export(
        ExportConfig(model=str(trained["ft"]), out=str(out), quantize="int8", data=trained["test"], max_seq_len=32)
    )
    return out, info


def test_round_trip_several_batch_sizes_and_lengths(exported, trained):
    out, info = exported
    graph = onnx.load(str(out / "model.onnx")).graph
    for inp in graph.input:  # both axes symbolic, not fixed by the (2, 8) trace
        assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert info["verification"]["fp32_max_abs_diff"] < 1e-4
    assert {tuple(s) for s in info["verification"]["shapes"]} >= {(1, 2), (3, 17), (16, 32)}
    torch_rt, onnx_rt = TorchRuntime(str(trained["ft"]), precision="fp32"), OnnxRuntime(str(out), "fp32")
    assert onnx_rt.labels == torch_rt.labels == ["book", "hotel", "pc"]
    for batch_size in (1, 3, 8):
        for texts in (TEXTS[:batch_size], [t * 3 for t in TEXTS[-batch_size:]]):  # short, and truncated at 32
            a = torch_rt.predict(texts, batch_size=batch_size, max_seq_len=32)
            b = onnx_rt.predict(texts, batch_size=batch_size, max_seq_len=32)
            assert a.shape == (len(texts), 3)
            np.testing.assert_allclose(b, a, atol=1e-5)
    # text pairs go through token_type_ids alike
    pairs = ["酒店", "电脑屏幕", "书"]
    np.testing.assert_allclose(
        onnx_rt.predict(TEXTS[:3], pairs, max_seq_len=32), torch_rt.predict(TEXTS[:3], pairs, max_seq_len=32), atol=1e-5
    )


def test_int8_loads_predicts_and_reports_its_accuracy_change(exported, trained):
    out, info = exported
    assert (out / "model.int8.onnx").stat().st_size < 0.6 * (out / "model.onnx").stat().st_size
    assert info["size_mb"]["int8"] < info["size_mb"]["fp32"]
    stored = json.loads((out / "export.json").read_text())
    m = stored["data_metrics"]
    assert m["rows"] == 45 and m["fp32"]["accuracy"] > 0.6  # the trained model, not chance (1/3)
    assert m["int8_change_points"]["accuracy"] == pytest.approx(
        100 * (m["int8"]["accuracy"] - m["fp32"]["accuracy"]), abs=1e-3
    )
    rt = load_runtime(str(out))  # auto: the int8 model when there is one
    assert rt.kind == "onnx-int8"
    probs = rt.predict(["酒店房间早餐入住", "电脑性能屏幕电池", "书内容作者观点"])
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    assert [a["labels"] for a in rt.decide(probs, 2)] == [["hotel"], ["pc"], ["book"]]
    assert stored["verification"]["int8_same_best_label"] > 0.9


def test_predict_and_evaluate_accept_an_export_folder(exported, trained, tmp_path):
    out, _ = exported
    for model, name in ((str(trained["ft"] / "model"), "torch"), (str(out), "onnx")):
        assert (
            main(
                [
                    "evaluate",
                    "--model",
                    model,
                    "--data",
                    trained["test"],
                    "--out",
                    str(tmp_path / name),
                    "--max-seq-len",
                    "32",
                ]
            )
            == 0
        )
    torch_m = json.loads((tmp_path / "torch" / "metrics.json").read_text())
    onnx_m = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    stored = json.loads((out / "export.json").read_text())["data_metrics"]
    assert onnx_m["accuracy"] == pytest.approx(stored["int8"]["accuracy"])  # the int8 model, as measured at export
    assert torch_m["accuracy"] == pytest.approx(stored["fp32"]["accuracy"])  # fp32 ONNX == PyTorch
    assert main(["predict", "--model", str(out), "--input", trained["test"], "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 45 and all(r["labels"][0] in ("book", "hotel", "pc") for r in rows)


def test_verification_failure_is_an_error(exported, trained, tiny_model, tmp_path, capsys):
    """Above the tolerance the export fails loudly and leaves no folder that looks usable."""
    from domainlm.classify.model import load_classifier

    out = tmp_path / "strict"
    # fused attention sums in another order than PyTorch: differences of ~1e-8, far above 1e-15
    assert main(["export", str(trained["ft"]), "--out", str(out), "--tolerance", "1e-15"]) == 2
    assert "ONNX Runtime and PyTorch disagree" in capsys.readouterr().err
    assert not (out / "export.json").exists()
    with pytest.raises(DomainLMError, match="not a complete export"):
        OnnxRuntime(str(out))
    # the same check sees a graph that is not the model's
    rt = OnnxRuntime(str(exported[0]), "fp32")
    other = load_classifier(tiny_model, rt.labels, False, "full", 16, 32).eval()  # fresh, untrained head
    diff, _ = compare(rt, other, sample_batches(rt.tokenizer, rt.input_names, 16, 2), False)
    assert diff > 1e-3


def test_cli_export_bad_inputs_and_refusals(trained, tmp_path, capsys):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("keep me")
    assert main(["export", str(trained["ft"]), "--out", str(keep)]) == 2
    assert "holds mine.txt, not from `domainlm export`" in capsys.readouterr().err
    assert (keep / "mine.txt").read_text() == "keep me"
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "e")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(trained["ft"]), "--out", str(tmp_path / "e"), "--tolerance", "0"]) == 2
    assert "--tolerance = 0" in capsys.readouterr().err
    assert main(["export", str(trained["ft"]), "--model", "other", "--out", str(tmp_path / "e")]) == 2
    assert "two models given" in capsys.readouterr().err
    with pytest.raises(DomainLMError, match="has no bogus model"):
        OnnxRuntime(str(trained["root"] / "export-int8"), "bogus")


def test_cli_export_fp32_then_reexport_over_it(trained, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["export", str(trained["ft"]), "--out", str(out), "--no-optimize", "--max-seq-len", "24"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["files"] == {"fp32": "model.onnx"} and info["optimized"] == {} and info["max_seq_len"] == 24
    assert "max |ORT - PyTorch| probability" in capsys.readouterr().err
    assert (out / "config.yaml").is_file() and (out / "tokenizer.json").is_file()
    before = (out / "model.onnx").read_bytes()
    assert main(["export", str(trained["ft"]), "--out", str(out)]) == 2  # an earlier export: only with --overwrite
    assert "holds an earlier finished `domainlm export` run" in capsys.readouterr().err
    assert (out / "model.onnx").read_bytes() == before
    assert main(["export", str(trained["ft"]), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "export.json").read_text())["optimized"]  # fused this time
