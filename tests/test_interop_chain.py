"""Folders as users have them through the whole chain: prepare -> pretrain -> finetune -> evaluate, and
corpora of other tools given as a folder to prepare."""

import json
from pathlib import Path

import numpy as np
import pytest

from domainlm.cli import main
from domainlm.data.store import Corpus, write_megatron
from domainlm.interop import paddle as paddle_interop
from tests.conftest import make_documents, save_tiny_model
from tests.test_classify import make_rows, write_jsonl
from tests.test_interop import PADDLE_DIR, tree_digest

PRETRAIN = [
    "--max-seq-len",
    "48",
    "--batch-size",
    "4",
    "--logging-freq",
    "1",
    "--eval-iters",
    "1",
    "--num-workers",
    "0",
    "--no-tensorboard",
    "--max-steps",
    "3",
]
FINETUNE = ["--batch-size", "16", "--learning-rate", "2e-3", "--max-seq-len", "32", "--epochs", "1"]


def chain(tmp_path: Path, tokenizer: str, model: str) -> tuple[Path, Path]:
    """prepare -> pretrain -> finetune (on the final snapshot) -> evaluate on the run folder and its model/,
    predict with the run folder."""
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(make_documents(80)), encoding="utf-8")
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(12, 1))
    test = write_jsonl(tmp_path / "test.jsonl", make_rows(4, 2))
    assert (
        main(["prepare", str(docs), "--out", str(tmp_path / "corpus"), "--tokenizer", tokenizer, "--workers", "0"]) == 0
    )
    pt = tmp_path / "pt"
    assert main(["pretrain", "--corpus", str(tmp_path / "corpus"), "--model", model, "--out", str(pt), *PRETRAIN]) == 0
    ft = tmp_path / "ft"
    assert main(["finetune", "--model", str(pt / "final"), "--train", train, "--out", str(ft), *FINETUNE]) == 0
    results = []
    for given in (ft, ft / "model"):
        assert (
            main(["evaluate", "--model", str(given), "--data", test, "--out", str(tmp_path / f"ev-{given.name}")]) == 0
        )
        results.append(json.loads((tmp_path / f"ev-{given.name}" / "metrics.json").read_text())["accuracy"])
    assert results[0] == results[1]
    assert main(["predict", "--model", str(ft), "--input", test, "--out", str(tmp_path / "p.jsonl")]) == 0
    assert len((tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()) == 12
    return pt, ft


def test_vocab_txt_only_folder_through_the_chain(tmp_path, tokenizer, capsys):
    # a released checkpoint whose vocabulary comes as vocab.txt alone (bert-base-chinese, RoBERTa-wwm, ERNIE)
    model = Path(save_tiny_model(tmp_path / "bert-zh", tokenizer))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    for p in model.iterdir():
        if "token" in p.name or p.name == "vocab.txt":
            p.unlink()
    (model / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    chain(tmp_path, str(model), str(model))
    assert "has vocab.txt but no tokenizer.json; read it as a BERT WordPiece vocabulary" in capsys.readouterr().err


def test_paddlenlp_folder_through_the_chain_converted_into_the_run(tmp_path, capsys):
    before = tree_digest(PADDLE_DIR)
    pt, _ = chain(tmp_path, str(PADDLE_DIR), str(PADDLE_DIR))
    out = capsys.readouterr().out
    assert (
        f"model: {PADDLE_DIR} is a PaddleNLP folder; converting it to Hugging Face format in {pt / 'converted-model'}"
        in out
    )
    assert json.loads((pt / "converted-model" / "conversion.json").read_text())["architecture"] == "ErnieForPreTraining"
    config = json.loads((pt / "final" / "config.json").read_text())
    assert (config["model_type"], config["use_task_id"], config["type_vocab_size"]) == ("ernie", True, 4)
    # fine-tuning the PaddleNLP folder directly converts it into that run; a second run reuses the conversion
    train = str(tmp_path / "train.jsonl")
    assert (
        main(["finetune", "--model", str(PADDLE_DIR), "--train", train, "--out", str(tmp_path / "ft2"), *FINETUNE]) == 0
    )
    messages = []
    assert paddle_interop.converted_copy(PADDLE_DIR, tmp_path / "ft2", log=messages.append) == str(
        tmp_path / "ft2" / "converted-model"
    )
    assert messages == [
        f"model: {PADDLE_DIR} is a PaddleNLP folder; using its conversion in {tmp_path / 'ft2' / 'converted-model'}"
    ]
    assert tree_digest(PADDLE_DIR) == before


def test_prepare_imports_paddlenlp_and_megatron_pairs_given_as_folders(tmp_path, tokenizer_dir, capsys):
    rng = np.random.default_rng(0)
    docs = [[list(rng.integers(5, 290, size=rng.integers(3, 9))) for _ in range(rng.integers(1, 4))] for _ in range(7)]
    megatron = tmp_path / "megatron"
    megatron.mkdir()
    write_megatron(megatron / "corpus_text_sentence", docs[:4])
    paddle = tmp_path / "paddlenlp"
    paddle.mkdir()
    rest = docs[4:]
    lens = [len(s) for d in rest for s in d]
    np.save(paddle / "domain_ids.npy", np.asarray([t for d in rest for s in d for t in s], dtype=np.int32))
    np.savez(
        paddle / "domain_idx.npz", lens=np.asarray(lens), docs=np.concatenate([[0], np.cumsum([len(d) for d in rest])])
    )
    out = tmp_path / "store"
    assert (
        main(["prepare", str(megatron), str(paddle), "--out", str(out), "--tokenizer", tokenizer_dir, "--workers", "0"])
        == 0
    )
    corpus = Corpus(out)
    assert corpus.n_documents == 7 and corpus.n_sentences == sum(len(d) for d in docs)
    assert [int(t) for t in corpus.tokens] == [t for d in docs for s in d for t in s]
    # a folder with neither documents nor a complete pair still says what it looked for
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.bin").write_bytes(b"\0" * 8)
    assert main(["prepare", str(tmp_path / "other"), "--out", str(tmp_path / "s2"), "--tokenizer", tokenizer_dir]) == 2
    assert "holds no readable files" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
