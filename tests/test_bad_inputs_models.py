"""The bad-input catalogue, continued: damaged model and corpus files, token lists, PaddleNLP folders, resuming.
Each case is run as a user would type it: a one-line message (exit 2) or a visible warning, nothing half-written."""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from domainlm.cli import main
from domainlm.errors import DomainLMError
from tests.conftest import one_line
from tests.test_bad_inputs import FAST, classifier, labelled  # noqa: F401 - shared module fixtures
from tests.test_interop import PADDLE_DIR
from tests.test_train_checkpoint import args as pretrain_args


def truncated_copy(src, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return dst


# ---- model files --------------------------------------------------------------------------------------------


def test_a_truncated_safetensors_file_is_one_line_for_pretrain_finetune_and_evaluate(
    tmp_path, tiny_model, corpus_dir, classifier, labelled, err
):
    model = truncated_copy(tiny_model, tmp_path / "m")
    expected = f"{model}: a .safetensors file is damaged or truncated (Error while deserializing header"
    assert expected in one_line(err(*pretrain_args(corpus_dir, model, tmp_path / "p", "--max-steps", "2")))
    assert expected in one_line(
        err("finetune", "--model", model, "--train", labelled["train"], "--out", tmp_path / "f", *FAST)
    )
    trained = truncated_copy(classifier / "model", tmp_path / "c")
    assert f"{trained}: a .safetensors file is damaged" in one_line(
        err("evaluate", "--model", trained, "--data", labelled["test"], "--out", tmp_path / "e")
    )


def test_a_pickle_that_torch_refuses_is_one_line_for_predict_and_serve(tmp_path, classifier, labelled, err):
    from safetensors.torch import load_file

    from domainlm.classify.runtime import load

    model = tmp_path / "c"
    shutil.copytree(classifier / "model", model)
    state = load_file(model / "model.safetensors")
    torch.save({**state, "extra": argparse.Namespace(a=1)}, model / "pytorch_model.bin")  # not a tensor: refused
    (model / "model.safetensors").unlink()
    expected = f"{model}: its pytorch_model.bin holds more than tensors, and PyTorch's safe loading refused it"
    assert expected in one_line(
        err("predict", "--model", model, "--input", labelled["test"], "--out", tmp_path / "p.jsonl")
    )
    with pytest.raises(DomainLMError, match="safe loading refused it"):
        load(str(model), "auto", "cpu", 1)  # what serve opens


def test_a_converted_folder_without_vocab_is_warned_and_not_fine_tuned_on(tmp_path, labelled, err):
    src = tmp_path / "paddle"
    shutil.copytree(PADDLE_DIR, src)
    (src / "vocab.txt").unlink()
    warning = err("convert", src, "--out", tmp_path / "hf", code=0)
    assert f"warning: {src} has no vocab.txt, so {tmp_path / 'hf'} gets no tokenizer" in warning
    message = one_line(
        err("finetune", "--model", tmp_path / "hf", "--train", labelled["train"], "--out", tmp_path / "f", *FAST)
    )
    assert "entries for a model of 226 embeddings, so it is not the model's tokenizer" in message


# ---- corpus stores ------------------------------------------------------------------------------------------


def test_ids_beyond_the_vocabulary_and_negative_samples_are_named_before_any_work(
    tmp_path, corpus_dir, tiny_model, err
):
    store = tmp_path / "store"
    shutil.copytree(corpus_dir, store, ignore=shutil.ignore_patterns("cache"))
    meta = json.loads((store / "meta.json").read_text())
    tokens = np.memmap(store / "tokens.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"), mode="r+")
    tokens[3] = 60000
    tokens.flush()
    del tokens
    (store / "meta.json").write_text(json.dumps({**meta, "max_token_id": 60000}))  # as prepare records it
    message = one_line(err(*pretrain_args(store, tiny_model, tmp_path / "p", "--max-steps", "2")))
    assert f"{store}: token id 60000 is beyond the vocabulary of --model {tiny_model}" in message
    assert not (tmp_path / "p" / "checkpoints").exists()
    assert f"{store}: token id 60000 is beyond the tokenizer's vocabulary" in one_line(err("inspect", store))
    assert "--samples -1: give the number of sentences to decode, 0 or more" in one_line(
        err("inspect", corpus_dir, "--samples", "-1")
    )


def test_prepare_overwrite_accepts_its_own_store_with_pretrains_cache(tmp_path, zh_txt, tokenizer_dir, err):
    prep = ["prepare", zh_txt, "--tokenizer", tokenizer_dir, "--workers", "0", "--out", tmp_path / "s"]
    err(*prep, code=0)
    (tmp_path / "s" / "cache").mkdir()  # as pretrain leaves it (the sample index)
    (tmp_path / "s" / "cache" / "index.npy").write_bytes(b"0")
    err(*prep, "--overwrite", "--segment", code=0)
    assert "segment: true" in (tmp_path / "s" / "config.yaml").read_text() and not (tmp_path / "s" / "cache").exists()


# ---- extend-vocab ---------------------------------------------------------------------------------------------


def test_extend_vocab_token_lists(tmp_path, tiny_model, err):
    terms = tmp_path / "terms.txt"
    terms.write_bytes("# 术语\n验收标准\n".encode("utf-16"))  # with its byte order mark: read
    err("extend-vocab", "--model", tiny_model, "--tokens", terms, "--out", tmp_path / "a", code=0)
    from transformers import AutoTokenizer

    assert "验收标准" in AutoTokenizer.from_pretrained(str(tmp_path / "a")).get_vocab()
    terms.write_text("# nothing yet\n\n")
    assert f"--tokens {terms} lists no tokens" in one_line(
        err("extend-vocab", "--model", tiny_model, "--tokens", terms, "--out", tmp_path / "b")
    )
    terms.write_text("验收标准\nquality gate\n")
    assert f"--tokens {terms}, line 2: 'quality gate' contains a space" in one_line(
        err("extend-vocab", "--model", tiny_model, "--tokens", terms, "--out", tmp_path / "b")
    )
    terms.write_bytes(b"\xff\xfd\xfc\n")
    assert f"--tokens {terms}: not UTF-8 text" in one_line(
        err("extend-vocab", "--model", tiny_model, "--tokens", terms, "--out", tmp_path / "b")
    )
    assert not (tmp_path / "b").exists()


def test_extend_vocab_takes_a_paddlenlp_folder(tmp_path, err):
    terms = tmp_path / "terms.txt"
    terms.write_text("验收标准\n")
    before = sorted(p.name for p in PADDLE_DIR.iterdir())
    err("extend-vocab", "--model", PADDLE_DIR, "--tokens", terms, "--out", tmp_path / "x", code=0)
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    assert config["model_type"] == "ernie" and config["vocab_size"] == 227
    assert sorted(p.name for p in PADDLE_DIR.iterdir()) == before


# ---- pretraining ------------------------------------------------------------------------------------------------


def test_resume_without_loadable_rng_states_warns(tmp_path, corpus_dir, tiny_model, err):
    from domainlm.train.checkpoint import _write_manifest

    out = tmp_path / "run"
    err(*pretrain_args(corpus_dir, tiny_model, out, "--max-steps", "2", "--checkpoint-steps", "2"), code=0)
    ckpt = out / "checkpoints" / "step-000002"
    (ckpt / "random_states_0.pkl").write_bytes(b"not a pickle")
    _write_manifest(ckpt)  # a file the manifest vouches for, that accelerate still cannot load
    message = err(*pretrain_args(corpus_dir, tiny_model, out, "--max-steps", "3", "--resume", "auto"), code=0)
    assert f"warning: {ckpt}: random_states_0.pkl could not be loaded; resuming without it" in message


def test_finetune_prints_its_data_parallel_layout(tmp_path, tiny_model, labelled, capsys):
    assert (
        main(
            [
                "finetune",
                "--model",
                tiny_model,
                "--train",
                labelled["train"],
                "--out",
                str(tmp_path / "f"),
                *FAST,
                "--global-batch-size",
                "16",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    assert "global batch 16 = 8 x 2 accumulation x 1 processes" in capsys.readouterr().out


def test_a_pretraining_split_without_samples_is_warned(tmp_path, tokenizer_dir, tiny_model, err):
    from domainlm.data.prepare import PrepareConfig, prepare
    from tests.conftest import make_documents

    docs = make_documents(6) + [f"第{i}号文档只有一句话，内容是关于酒店服务的评价{i}。" for i in range(60)]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs), encoding="utf-8")
    prepare(
        PrepareConfig(
            input=[str(tmp_path / "docs.txt")],
            out=str(tmp_path / "store"),
            tokenizer=tokenizer_dir,
            workers=0,
            segment=True,
            near_dup_threshold=0,
        ),
        progress=False,
    )
    message = err(
        *pretrain_args(
            tmp_path / "store",
            tiny_model,
            tmp_path / "p",
            "--max-steps",
            "1",
            "--split",
            "80,10,10",
            "--global-batch-size",
            "4",
        ),
        code=0,
    )
    assert "warning: the test split (7 documents) holds 0 samples (too few sentences for SOP): no test loss" in message
