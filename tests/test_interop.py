"""PaddleNLP folders, vocab.txt-only vocabularies, model names and output folders as inputs.

The fixture in tests/fixtures/paddle_ernie was written by PaddleNLP 2.8.1 on PaddlePaddle 3.3.1 (see its
make_fixture.py): a random 2-layer, 32-wide ERNIE 3.0 with task type embeddings and 4 token types, its
tokenizer's ids and its outputs on four texts; a 1-layer BERT and a 1-layer ERNIE classifier beside it.
These tests need neither Paddle nor a network.
"""

import hashlib
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from domainlm.cli import main
from domainlm.errors import DomainLMError
from domainlm.interop import paddle
from domainlm.interop.names import PADDLE_TO_HF, hub_name
from domainlm.interop.resolve import looks_local, resolve_model_dir
from domainlm.interop.tokenizer import load_fast_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "paddle_ernie"
PADDLE_DIR = FIXTURE / "current"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def legacy_folder(root: Path) -> Path:
    """The fixture with its config in PaddleNLP's older format (model_config.json with init_args)."""
    out = root / "legacy"
    shutil.copytree(PADDLE_DIR, out)
    (out / "config.json").unlink()
    shutil.copy(FIXTURE / "legacy_model_config.json", out / "model_config.json")
    return out


def assert_reproduces_paddle(hf_dir: Path) -> None:
    from transformers import ErnieForPreTraining

    model = ErnieForPreTraining.from_pretrained(hf_dir).eval()
    tokenizer = load_fast_tokenizer(str(hf_dir))
    expected = np.load(FIXTURE / "expected.npz")
    for i, (text, pair) in enumerate(EXPECTED["texts"]):
        enc = tokenizer(text, pair) if pair else tokenizer(text)
        assert enc["input_ids"] == EXPECTED["input_ids"][i], text
        assert enc["token_type_ids"] == EXPECTED["token_type_ids"][i], text
        ids, types = torch.tensor([enc["input_ids"]]), torch.tensor([enc["token_type_ids"]])
        with torch.no_grad():
            base = model.ernie(input_ids=ids, token_type_ids=types)
            heads = model(input_ids=ids, token_type_ids=types)
        for name, value in (
            ("last_hidden_state", base.last_hidden_state),
            ("pooler_output", base.pooler_output),
            ("mlm_logits", heads.prediction_logits),
            ("sop_logits", heads.seq_relationship_logits),
        ):
            diff = np.abs(value[0].numpy() - expected[f"{name}_{i}"]).max()
            assert diff < 1e-4, (name, i, diff)


# ---- conversion -------------------------------------------------------------------------------------------


def test_convert_reproduces_paddlenlp_outputs_and_ids_and_leaves_the_source_alone(tmp_path, capsys):
    before = tree_digest(PADDLE_DIR)
    out = tmp_path / "hf"
    assert main(["convert", str(PADDLE_DIR), "--out", str(out)]) == 0
    assert "ErnieForPreTraining, 49 weights" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["use_task_id"], config["task_type_vocab_size"], config["type_vocab_size"]) == (
        "ernie",
        True,
        16,
        4,
    )
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert_reproduces_paddle(out)
    assert tree_digest(PADDLE_DIR) == before
    # a second run refuses to overwrite; --out inside the PaddleNLP folder is refused
    assert main(["convert", str(PADDLE_DIR), "--out", str(out)]) == 2
    assert "holds an earlier finished `domainlm convert` run" in capsys.readouterr().err
    assert main(["convert", str(PADDLE_DIR), "--out", str(PADDLE_DIR / "hf")]) == 2
    assert "inside the PaddleNLP folder" in capsys.readouterr().err
    assert tree_digest(PADDLE_DIR) == before


def test_legacy_model_config_maps_to_the_same_config_and_outputs(tmp_path):
    legacy = legacy_folder(tmp_path)
    skip = {"transformers_version", "_name_or_path", "architectures"}
    new, old = paddle.hf_config(PADDLE_DIR).to_dict(), paddle.hf_config(legacy).to_dict()
    assert {k: v for k, v in old.items() if k not in skip} == {k: v for k, v in new.items() if k not in skip}
    assert old["use_task_id"] is True and old["type_vocab_size"] == 4 and old["task_type_vocab_size"] == 16
    paddle.convert(legacy, tmp_path / "hf", log=lambda *_: None)
    assert_reproduces_paddle(tmp_path / "hf")


def test_paddlenlp_safetensors_folder_converts_alike(tmp_path):
    # PaddleNLP 2.8.1's save_pretrained(safe_serialization=True) writes the .pdparams names and arrays
    # unchanged into model.safetensors (checked when this fixture was made); built here from the fixture
    from safetensors.numpy import save_file

    folder = tmp_path / "paddle-safetensors"
    shutil.copytree(PADDLE_DIR, folder)
    save_file(paddle.load_pdparams(folder / paddle.WEIGHTS), str(folder / "model.safetensors"))
    (folder / paddle.WEIGHTS).unlink()
    assert paddle.is_paddle_folder(folder)
    paddle.convert(folder, tmp_path / "hf", log=lambda *_: None)
    assert_reproduces_paddle(tmp_path / "hf")


def test_paddle_tokenizer_folder_gives_paddlenlp_ids():
    tokenizer = load_fast_tokenizer(str(PADDLE_DIR))
    for i, (text, pair) in enumerate(EXPECTED["texts"]):
        assert (tokenizer(text, pair) if pair else tokenizer(text))["input_ids"] == EXPECTED["input_ids"][i]
    # PaddleNLP's from_pretrained tokenizer reads a literal "[MASK]" in text as the mask token, and so do we
    assert tokenizer.mask_token_id in EXPECTED["input_ids"][2]


def test_paddle_bert_and_classifier_folders_reproduce_paddlenlp(tmp_path):
    from transformers import BertForPreTraining, ErnieForSequenceClassification

    expected = np.load(FIXTURE / "expected_variants.npz")
    paddle.convert(FIXTURE / "bert", tmp_path / "bert", log=lambda *_: None)
    paddle.convert(FIXTURE / "classifier", tmp_path / "cls", log=lambda *_: None)
    bert = BertForPreTraining.from_pretrained(tmp_path / "bert").eval()
    classifier = ErnieForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    assert classifier.config.num_labels == 3
    bert_tokenizer = load_fast_tokenizer(str(tmp_path / "bert"))
    for i, (text, pair) in enumerate(EXPECTED["texts"]):
        assert (bert_tokenizer(text, pair) if pair else bert_tokenizer(text))["input_ids"] == EXPECTED["input_ids"][i]
        ids, types = torch.tensor([EXPECTED["input_ids"][i]]), torch.tensor([EXPECTED["token_type_ids"][i]])
        with torch.no_grad():
            base = bert.bert(input_ids=ids, token_type_ids=types)
            got = {
                "bert_last_hidden_state": base.last_hidden_state,
                "bert_pooler_output": base.pooler_output,
                "bert_sop_logits": bert(input_ids=ids, token_type_ids=types).seq_relationship_logits,
                "classifier_logits": classifier(input_ids=ids, token_type_ids=types).logits,
            }
            if i == 0:
                got["bert_mlm_logits"] = bert(input_ids=ids).prediction_logits
        for name, value in got.items():
            assert np.abs(value[0].numpy() - expected[f"{name}_{i}"]).max() < 1e-4, (name, i)


def _write_pdparams(folder: Path, state: dict) -> None:
    with open(folder / paddle.WEIGHTS, "wb") as f:
        pickle.dump(state, f, protocol=2)


def test_every_paddle_tensor_used_and_every_hf_weight_filled_or_refused(tmp_path):
    state = paddle.load_pdparams(PADDLE_DIR / paddle.WEIGHTS)
    extra = tmp_path / "extra"
    shutil.copytree(PADDLE_DIR, extra)
    _write_pdparams(extra, {**state, "ernie.encoder.adapter.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(
        DomainLMError, match=r"1 Paddle tensors have no Hugging Face counterpart \(ernie.encoder.adapter.weight\)"
    ):
        paddle.convert(extra, tmp_path / "a", log=lambda *_: None)
    missing = tmp_path / "missing"
    shutil.copytree(PADDLE_DIR, missing)
    _write_pdparams(missing, {k: v for k, v in state.items() if k != "ernie.encoder.layers.1.linear2.weight"})
    with pytest.raises(DomainLMError, match=r"ernie.encoder.layer.1.output.dense.weight"):
        paddle.convert(missing, tmp_path / "b", log=lambda *_: None)
    wrong = tmp_path / "wrong"
    shutil.copytree(PADDLE_DIR, wrong)
    _write_pdparams(wrong, {**state, "ernie.pooler.dense.weight": np.zeros((32, 31), np.float32)})
    with pytest.raises(DomainLMError, match=r"ernie.pooler.dense.weight \(31, 32\) vs \(32, 32\)"):
        paddle.convert(wrong, tmp_path / "c", log=lambda *_: None)
    assert not any((tmp_path / n).exists() for n in "abc")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pdparams_reader_admits_numpy_arrays_only(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "model_state.pdparams"
    with open(bad, "wb") as f:
        pickle.dump({"ernie.embeddings.word_embeddings.weight": _RunsCode(marker)}, f)
    with pytest.raises(DomainLMError, match="system is not a numpy array part; refusing to load it"):
        paddle.load_pdparams(bad)
    assert not marker.exists()
    state = paddle.load_pdparams(PADDLE_DIR / paddle.WEIGHTS)  # what paddle.save wrote: arrays, by name
    assert state["ernie.encoder.layers.0.linear1.weight"].shape == (32, 64)  # Paddle Linear: [in, out]


# ---- names, folders, mistyped paths -----------------------------------------------------------------------


def test_paddlenlp_names_map_to_hf_and_fail_clearly_offline(tmp_path, monkeypatch, capsys):
    assert hub_name("ernie-3.0-medium-zh") == "nghuyong/ernie-3.0-medium-zh"
    assert hub_name("ERNIE-3.0-Micro-zh") == "nghuyong/ernie-3.0-micro-zh"
    assert {"ernie-3.0-mini-zh", "ernie-3.0-base-zh", "ernie-3.0-nano-zh"} <= set(PADDLE_TO_HF)
    assert hub_name("bert-base-chinese") is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = tmp_path / "d.txt"
    docs.write_text("工程的进度计划需要按时完成。\n", encoding="utf-8")
    started = time.perf_counter()
    assert main(["prepare", str(docs), "--out", str(tmp_path / "c"), "--tokenizer", "ernie-3.0-micro-zh"]) == 2
    err = capsys.readouterr().err
    assert "nghuyong/ernie-3.0-micro-zh is not in the local cache and the hub is offline" in err
    assert "huggingface-cli download nghuyong/ernie-3.0-micro-zh" in err and "Traceback" not in err
    assert main(["prepare", str(docs), "--out", str(tmp_path / "c"), "--tokenizer", "bert-base-chines"]) == 2
    assert (
        "bert-base-chines: no such folder, and not in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
        in capsys.readouterr().err
    )
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "c").exists()


def test_mistyped_local_folder_fails_at_once(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "ernie-finetuned").mkdir(parents=True)
    docs = tmp_path / "d.txt"
    docs.write_text("工程的进度计划需要按时完成。\n", encoding="utf-8")
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "房间", "label": "a"}\n{"text": "电脑", "label": "b"}\n', encoding="utf-8")
    assert looks_local("runs/ernie-finetune") and looks_local("./x") and looks_local("/a/b") and looks_local("a/b/c")
    assert not looks_local("bert-base-chinese") and not looks_local("nghuyong/ernie-3.0-nano-zh")
    started = time.perf_counter()
    cases = [
        (["prepare", str(docs), "--out", "c", "--tokenizer", "./tokenizr"], "--tokenizer ./tokenizr: no such folder"),
        (
            ["finetune", "--model", "runs/ernie-finetune", "--train", str(data), "--out", "f"],
            "--model runs/ernie-finetune: no such folder; did you mean runs/ernie-finetuned?",
        ),
        (["evaluate", "--model", str(tmp_path / "runs" / "nope"), "--data", str(data), "--out", "e"], "no such folder"),
        (
            ["predict", "--model", "runs/x/model", "--input", str(data), "--out", "p.jsonl"],
            "--model runs/x/model: no such folder",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert time.perf_counter() - started < 10  # no network retries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.txt", "runs", "t.jsonl"]


def test_resolve_model_dir_run_folder_model_folder_hf_folder_and_many_runs(tmp_path, tiny_model):
    run = tmp_path / "run"
    shutil.copytree(tiny_model, run / "model")
    assert resolve_model_dir(str(run)) == str(run / "model")
    assert resolve_model_dir(str(run / "model")) == str(run / "model")
    assert resolve_model_dir(tiny_model) == tiny_model
    seeds = tmp_path / "seeds"
    for seed in (1, 2):
        shutil.copytree(tiny_model, seeds / f"seed-{seed}" / "model")
    with pytest.raises(DomainLMError, match=r"holds 2 fine-tuned runs \(seed-1, seed-2\); pass one of them"):
        resolve_model_dir(str(seeds))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DomainLMError, match="holds no model"):
        resolve_model_dir(str(tmp_path / "empty"))


def test_vocab_txt_only_folder_reads_as_bert_wordpiece(tmp_path, capsys):
    folder = tmp_path / "vocab-only"
    folder.mkdir()
    shutil.copy(PADDLE_DIR / "vocab.txt", folder / "vocab.txt")
    tokenizer = load_fast_tokenizer(str(folder))
    assert "read it as a BERT WordPiece vocabulary" in capsys.readouterr().err
    assert tokenizer.is_fast
    assert tokenizer("CAFÉ")["input_ids"] == tokenizer("cafe")["input_ids"]  # lower-cased, accents stripped
    assert tokenizer.convert_ids_to_tokens(tokenizer("工程hotel", add_special_tokens=False)["input_ids"]) == [
        "工",
        "程",
        "hotel",
    ]
    assert tokenizer("[MASK]", add_special_tokens=False)["input_ids"] == [tokenizer.mask_token_id]
    for i, (text, pair) in enumerate(EXPECTED["texts"]):  # the same ids as PaddleNLP's tokenizer on this vocabulary
        assert (tokenizer(text, pair) if pair else tokenizer(text))["input_ids"] == EXPECTED["input_ids"][i]
    (folder / "vocab.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(
        DomainLMError, match=r"special tokens \[CLS\], \[MASK\], \[PAD\], \[SEP\], \[UNK\] are not in the vocabulary"
    ):
        load_fast_tokenizer(str(folder))
