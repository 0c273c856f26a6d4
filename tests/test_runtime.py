"""The one prediction path (classify.runtime): length-sorted batches put back in input order, padding, the [CLS]-only
forward against the model's own, the label choice, and `predict` / `evaluate` agreeing across every model kind."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from domainlm.classify.batching import length_batches, pad
from domainlm.classify.model import load_classifier, save_classifier
from domainlm.classify.runtime import Runtime, TorchRuntime, best_k, choose
from domainlm.cli import main
from tests.test_export import exported, trained  # noqa: F401 - shared session fixtures

TEXTS = [
    "书内容作者观点" * 5,
    "酒店",
    "电脑性能屏幕电池",
    "入住",
    "书的内容很好，作者的观点值得推荐给朋友们" * 3,
    "键盘手感",
    "酒店房间早餐入住",
    "电脑",
]


@pytest.mark.parametrize("batch_size,budget", [(4, 0), (64, 40), (3, 25), (1, 0)])
def test_length_batches_cover_every_row_once_sorted_and_within_budget(batch_size, budget):
    lengths = np.random.default_rng(0).integers(1, 30, size=37)
    batches = length_batches(lengths, batch_size, budget)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(37))  # every row exactly once
    assert np.all(np.diff(lengths[rows]) >= 0)  # batches cut from the rows sorted by length
    for b in batches:
        assert len(b) <= batch_size
        assert len(b) == 1 or not budget or len(b) * lengths[b].max() <= budget
    if budget:  # a short row shares its batch with more rows than a long one
        assert len(batches[0]) > len(batches[-1])


def test_pad_right_pads_ids_with_the_pad_id_and_the_rest_with_zeros():
    batch = pad(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "token_type_ids": [0, 1, 1]},
            {"input_ids": [8], "attention_mask": [1], "token_type_ids": [0]},
        ],
        pad_id=3,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]] and batch["input_ids"].dtype == np.int64
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 1, 1], [0, 0, 0]]


def test_choose_argmax_or_saved_thresholds_and_best_k():
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.4, 0.4, 0.2]])
    assert choose(probs, False) == [[1], [0], [0]]  # a tie goes to the lower index
    assert choose(probs, True, np.array([0.5, 0.0, 0.31])) == [[1], [0, 1], [1]]
    assert choose(probs, True) == [[1], [0], []]  # no thresholds saved: 0.5
    assert best_k(probs, 2).tolist() == [[1, 2], [0, 2], [0, 1]]


def test_torch_runtime_equals_the_full_forward_of_each_text_alone_in_input_order(trained):
    """Sorted, padded or not, [CLS]-only last layer: the same probabilities as the model's own forward, per text."""
    rt = TorchRuntime(str(trained["ft"]), precision="fp32")  # auto is bf16 on a CPU that has it
    assert rt.kind == "pytorch-fp32" and rt.labels == ["book", "hotel", "pc"]
    expected = []
    with torch.inference_mode():
        for text in TEXTS:
            enc = rt.tokenizer(text, truncation=True, max_length=32, return_tensors="pt")
            expected.append(torch.softmax(rt.model(**enc).logits, -1)[0].numpy())
    for batch_size in (1, 3, 8):
        got = rt.predict(TEXTS, batch_size=batch_size, max_seq_len=32)
        np.testing.assert_allclose(got, np.stack(expected), atol=1e-5)
    same_length = ["酒店房间", "电脑屏幕", "书的内容"]  # one batch with no padding: attention runs with no mask
    assert len({len(f["input_ids"]) for f in rt.encode(same_length)}) == 1
    np.testing.assert_allclose(rt.predict(same_length), rt.predict(same_length, batch_size=1), atol=1e-6)
    assert rt.predict([]).shape == (0, 3)
    repeated = [TEXTS[2], TEXTS[0], TEXTS[2], TEXTS[1], TEXTS[0]]  # repeats run once, every row gets its answer
    np.testing.assert_allclose(
        rt.predict(repeated, batch_size=2, max_seq_len=32), np.stack(expected)[[2, 0, 2, 1, 0]], atol=1e-5
    )


def rows(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_predict_and_evaluate_agree_for_every_model_kind(trained, exported, tmp_path):
    """A finetune output, its model/ folder and its fp32 export give the same labels and scores at the same precision
    (auto is bf16 on a CPU that has it); a linear model goes through the same interface; evaluate's predictions are
    predict's."""
    ft, test = trained["ft"], trained["test"]
    assert main(["export", str(ft), "--out", str(tmp_path / "fp32"), "--max-seq-len", "32"]) == 0
    assert (
        main(
            [
                "finetune",
                "--method",
                "linear",
                "--train",
                str(trained["root"] / "train.jsonl"),
                "--dev",
                str(trained["root"] / "dev.jsonl"),
                "--out",
                str(tmp_path / "linear"),
            ]
        )
        == 0
    )
    got = {}
    for name, model in (
        ("run", ft),
        ("model", ft / "model"),
        ("fp32", tmp_path / "fp32"),
        ("int8", exported[0]),
        ("linear", tmp_path / "linear"),
    ):
        precision = ["--precision", "fp32"] if name in ("run", "model", "fp32") else []
        assert (
            main(
                [
                    "predict",
                    "--model",
                    str(model),
                    "--input",
                    test,
                    "--out",
                    str(tmp_path / f"{name}.jsonl"),
                    "--max-seq-len",
                    "32",
                    "--top-k",
                    "3",
                    *precision,
                ]
            )
            == 0
        )
        got[name] = rows(tmp_path / f"{name}.jsonl")
        assert (
            main(
                [
                    "evaluate",
                    "--model",
                    str(model),
                    "--data",
                    test,
                    "--out",
                    str(tmp_path / f"ev-{name}"),
                    "--max-seq-len",
                    "32",
                    *precision,
                ]
            )
            == 0
        )
        assert [r["predicted"] for r in rows(tmp_path / f"ev-{name}" / "eval_predictions.jsonl")] == [
            r["labels"] for r in got[name]
        ]
    assert got["run"] == got["model"]
    for a, b in zip(got["model"], got["fp32"]):
        assert a["labels"] == b["labels"] and a["scores"].keys() == b["scores"].keys()
        np.testing.assert_allclose(list(a["scores"].values()), list(b["scores"].values()), atol=2e-4)
    gold = [r["label"] for r in rows(Path(test))]
    for name in ("model", "int8", "linear"):  # every kind learned the task (chance: 1/3)
        assert np.mean([r["labels"] == [g] for r, g in zip(got[name], gold)]) > 0.6, name


def test_predict_uses_the_thresholds_saved_with_a_multilabel_model(tmp_path, tiny_model, tokenizer):
    labels = ["a", "b", "c"]
    model = load_classifier(tiny_model, labels, True, "full", 16, 32)
    # thresholds 0 and above 1: label a and c always, b never, whatever the (untrained) scores
    folder = save_classifier(model, tokenizer, tmp_path / "ml", labels, True, thresholds=[0.0, 1.01, 0.0])
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "酒店"}\n{"text": "电脑屏幕电池"}\n', encoding="utf-8")
    assert main(["predict", "--model", str(folder), "--input", str(src), "--out", str(tmp_path / "p.jsonl")]) == 0
    assert [r["labels"] for r in rows(tmp_path / "p.jsonl")] == [["a", "c"], ["a", "c"]]
    assert isinstance(TorchRuntime(str(folder)), Runtime)


def test_the_runtime_packs_batches_and_gives_the_padded_probabilities(trained):
    """A BERT classifier runs packed on any device (no padded position in a linear layer; the CPU's attention kernel
    stands in for flash), with every batch queued before the first result is read; GPU-sized batch limits."""
    rt = TorchRuntime(str(trained["ft"]), precision="fp32")  # equal within fp32's rounding
    assert rt.packed and rt.batch_limits() == (64, 8192)  # CPU-sized batches
    features = rt.encode(TEXTS[:3], max_seq_len=32)
    batch = rt.feed(features)
    assert batch["input_ids"].ndim == 1 and batch["input_ids"].numel() == sum(len(f["input_ids"]) for f in features)
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["max_len"] == max(len(f["input_ids"]) for f in features)
    packed = rt.predict(TEXTS, batch_size=3, max_seq_len=32)
    rt.packed = False  # the padded [CLS]-only forward
    assert rt.feed(features)["input_ids"].ndim == 2
    np.testing.assert_allclose(packed, rt.predict(TEXTS, batch_size=3, max_seq_len=32), atol=1e-5)
    rt.device = "cuda"  # the limits a GPU runtime uses (nothing runs on the device here)
    assert rt.batch_limits() == (512, 65536) and rt.batch_limits(100) == (100, 65536)


def test_padded_batches_are_cut_where_padding_plus_calls_cost_least():
    """The cuts of a model that pads: least padded tokens + CALL_TOKENS per call, checked against every partition
    of a few sorted lengths; texts of one length share a batch, one long text runs alone."""
    from itertools import combinations

    def cost(batches, lengths, call):
        return sum(len(b) * lengths[b].max() + call for b in batches)

    rng = np.random.default_rng(1)
    for _ in range(30):
        lengths = rng.integers(1, 60, size=int(rng.integers(1, 9)))
        call, rows_cap = int(rng.integers(1, 40)), int(rng.integers(1, 6))
        batches = length_batches(lengths, rows_cap, 0, call)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
        assert all(len(b) <= rows_cap for b in batches)
        s = np.sort(lengths)
        best = min(
            cost([np.arange(a, b) for a, b in zip((0, *cuts), (*cuts, len(s)))], s, call)
            for k in range(len(s))
            for cuts in combinations(range(1, len(s)), k)
            if all(b - a <= rows_cap for a, b in zip((0, *cuts), (*cuts, len(s))))
        )
        assert cost(batches, lengths, call) == best, (lengths, call, rows_cap)
    lengths = np.array([10, 10, 10, 10, 128])
    assert [sorted(b.tolist()) for b in length_batches(lengths, 64, 8192, 8)] == [[0, 1, 2, 3], [4]]
    assert [sorted(b.tolist()) for b in length_batches(lengths, 64, 8192)] == [[0, 1, 2, 3, 4]]  # packed: one batch
