"""Sample index, masking, the pretrain command (loss, snapshots, resume, 2 processes) and its bad inputs."""

import os
import shutil

import numpy as np
import pytest
import torch

from domainlm.cli import main
from domainlm.data.store import Corpus
from domainlm.errors import DomainLMError
from domainlm.pretrain.dataset import PretrainDataset, StepBatchSampler, truncate_pair
from domainlm.pretrain.masking import MaskingOptions, mask_tokens, ngram_probabilities
from domainlm.pretrain.samples import build_samples, cached_samples, split_documents
from domainlm.train.logging import read_log
from tests.conftest import save_tiny_model

FAST = [
    "--max-seq-len",
    "48",
    "--batch-size",
    "4",
    "--logging-freq",
    "1",
    "--eval-iters",
    "2",
    "--num-workers",
    "0",
    "--no-tensorboard",
]


def pretrain(corpus, model, out, *flags):
    return main(["pretrain", "--corpus", corpus, "--model", model, "--out", str(out), *FAST, *flags])


# ---- samples ----------------------------------------------------------------------------------------------


def test_split_is_by_document_disjoint_and_complete():
    parts = split_documents(100, (0.8, 0.1, 0.1), seed=1)
    all_docs = np.concatenate(list(parts.values()))
    assert sorted(all_docs.tolist()) == list(range(100))
    assert [len(parts[k]) for k in ("train", "valid", "test")] == [80, 10, 10]
    assert len(split_documents(5, (0.98, 0.01, 0.01), seed=1)["valid"]) == 1  # never an empty eval split
    with pytest.raises(DomainLMError, match="too few to split"):
        split_documents(2, (0.98, 0.01, 0.01), seed=1)


@pytest.mark.parametrize("min_sentences", [1, 2])
def test_samples_stay_in_one_document_and_fill_up_to_max(corpus_dir, min_sentences):
    corpus = Corpus(corpus_dir)
    docs = np.arange(corpus.n_documents)
    samples, report = build_samples(
        corpus, docs, max_tokens=40, short_seq_prob=0.0, min_sentences=min_sentences, seed=3
    )
    doc_of = np.searchsorted(np.asarray(corpus.document_offsets), samples, side="right") - 1
    assert (
        doc_of[:, 0] == np.searchsorted(np.asarray(corpus.document_offsets), samples[:, 1] - 1, side="right") - 1
    ).all()
    assert ((samples[:, 1] - samples[:, 0]) >= min_sentences).all()
    lengths = np.asarray(corpus.sentence_offsets)[samples[:, 1]] - np.asarray(corpus.sentence_offsets)[samples[:, 0]]
    # a sample goes over max only when its forced minimum of sentences does
    over = lengths > 40
    assert report["samples_truncated"] == int(over.sum())
    if min_sentences == 1:
        firsts = np.diff(np.asarray(corpus.sentence_offsets))[samples[over, 0]]
        assert (firsts > 40).all() or not over.any()
    # every sentence of a usable document is in exactly one sample
    covered = np.zeros(corpus.n_sentences, int)
    for a, b in samples:
        covered[a:b] += 1
    assert covered.max() == 1 and covered.sum() == corpus.n_sentences - report["sentences_unusable"]


def test_sample_index_is_cached_and_keyed(corpus_dir):
    corpus = Corpus(corpus_dir)
    docs = np.arange(10)
    a, _ = cached_samples(corpus, "train", docs, 40, 0.1, 2, seed=1)
    files = list((corpus.path / "cache").glob("samples-train-*.npy"))
    b, _ = cached_samples(corpus, "train", docs, 40, 0.1, 2, seed=1)
    assert np.array_equal(a, b) and len(list((corpus.path / "cache").glob("samples-train-*.npy"))) == len(files)
    cached_samples(corpus, "train", docs, 30, 0.1, 2, seed=1)
    assert len(list((corpus.path / "cache").glob("samples-train-*.npy"))) == len(files) + 1


def test_sop_pairs_are_balanced_and_well_formed(corpus_dir, tokenizer):
    corpus = Corpus(corpus_dir)
    samples, _ = build_samples(corpus, np.arange(corpus.n_documents), 45, 0.0, 2, seed=0)
    special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "mask": tokenizer.mask_token_id}
    ds = PretrainDataset(
        corpus, samples, "train", 48, True, MaskingOptions(max_predictions=7), special, len(tokenizer), 0, True
    )
    items = [ds[g] for g in range(400)]
    swapped = np.mean([int(x["sop_labels"]) for x in items])
    assert 0.4 < swapped < 0.6
    for x in items:
        ids = np.where(x["labels"] >= 0, x["labels"], x["input_ids"])  # undo masking
        assert len(ids) <= 48 and ids[0] == special["cls"] and ids[-1] == special["sep"]
        assert (ids == special["sep"]).sum() == 2
        sep = int(np.flatnonzero(ids == special["sep"])[0])
        assert (x["token_type_ids"][: sep + 1] == 0).all() and (x["token_type_ids"][sep + 1 :] == 1).all()
    assert (
        truncate_pair(30, 10, 32) == (22, 10)
        and truncate_pair(20, 20, 30) == (15, 15)
        and truncate_pair(3, 4, 10) == (3, 4)
    )


def test_epochs_reshuffle_and_masks_are_dynamic_but_reproducible(corpus_dir, tokenizer):
    corpus = Corpus(corpus_dir)
    samples, _ = build_samples(corpus, np.arange(corpus.n_documents), 45, 0.0, 1, seed=0)
    special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "mask": tokenizer.mask_token_id}
    ds = PretrainDataset(corpus, samples, "train", 48, False, MaskingOptions(), special, len(tokenizer), 5, True)
    n = len(ds)
    assert sorted(ds._sample_index(g) for g in range(n)) == list(range(n))
    assert [ds._sample_index(g) for g in range(n)] != [ds._sample_index(g) for g in range(n, 2 * n)]
    a, b = ds[3], ds[3]
    assert np.array_equal(a["input_ids"], b["input_ids"])
    # the same underlying sample in the next epoch gets a different mask
    g2 = n + [ds._sample_index(g) for g in range(n, 2 * n)].index(ds._sample_index(3))
    assert np.array_equal(
        np.where(a["labels"] >= 0, a["labels"], a["input_ids"]),
        np.where(ds[g2]["labels"] >= 0, ds[g2]["labels"], ds[g2]["input_ids"]),
    )
    assert not np.array_equal(a["labels"], ds[g2]["labels"])


# ---- masking ---------------------------------------------------------------------------------------------


def _words(n_words, rng):
    lengths = rng.integers(1, 4, size=n_words)
    starts = np.concatenate([[True, *([False] * (k - 1))] for k in lengths]).astype(bool)
    return starts


def test_whole_words_masked_together_specials_never_rate_close():
    rng = np.random.default_rng(0)
    total, masked = 0, 0
    for trial in range(300):
        starts = _words(60, rng)
        ids = rng.integers(10, 500, size=len(starts))
        special = np.zeros(len(ids), bool)
        special[[0, len(ids) // 2, len(ids) - 1]] = True
        opts = MaskingOptions(masked_lm_prob=0.15, max_predictions=1000, max_ngrams=3)
        out, labels = mask_tokens(ids, starts, special, opts, 500, 4, np.random.default_rng(trial))
        picked = labels >= 0
        assert not picked[special].any()
        assert (labels[picked] == ids[picked]).all() and (out[~picked] == ids[~picked]).all()
        word_id = np.cumsum(starts | special)
        for w in np.unique(word_id[picked & ~special]):
            members = (word_id == w) & ~special
            assert picked[members].all(), "a word was masked only in part"
        total += (~special).sum()
        masked += picked.sum()
    assert abs(masked / total - 0.15) < 0.02
    # 80% [MASK], 10% random, 10% kept, over many positions
    ids = np.arange(10, 20010)
    out, labels = mask_tokens(
        ids,
        np.ones(len(ids), bool),
        np.zeros(len(ids), bool),
        MaskingOptions(max_predictions=10**6, whole_word=False),
        30000,
        4,
        np.random.default_rng(1),
    )
    picked = labels >= 0
    share_mask = (out[picked] == 4).mean()
    share_keep = (out[picked] == ids[picked]).mean()
    assert abs(share_mask - 0.8) < 0.03 and abs(share_keep - 0.1) < 0.03


def test_cap_and_ngram_distribution():
    ids = np.arange(100, 612)
    _, labels = mask_tokens(
        ids,
        np.ones(512, bool),
        np.zeros(512, bool),
        MaskingOptions(max_predictions=20),
        1000,
        4,
        np.random.default_rng(0),
    )
    assert (labels >= 0).sum() == 20
    p = ngram_probabilities(3, False)
    assert np.allclose(p, np.array([1, 1 / 2, 1 / 3]) / (11 / 6))
    assert np.allclose(ngram_probabilities(3, True), p[::-1])


def test_step_batch_sampler_resumes_at_data_position():
    full = iter(StepBatchSampler(0, 8, 2, rank=1, world_size=2))
    first = [next(full) for _ in range(6)]
    assert first[:2] == [[4, 5], [6, 7]] and first[2] == [12, 13]
    resumed = iter(StepBatchSampler(16, 8, 2, rank=1, world_size=2))
    assert next(resumed) == first[4]


# ---- the command -----------------------------------------------------------------------------------------


def test_loss_decreases_snapshots_load_under_any_name(tmp_path, corpus_dir, tiny_model):
    out = tmp_path / "run"
    assert (
        pretrain(
            corpus_dir,
            tiny_model,
            out,
            "--max-steps",
            "40",
            "--learning-rate",
            "3e-3",
            "--warmup-ratio",
            "0.05",
            "--save-steps",
            "20",
            "--eval-steps",
            "20",
            "--checkpoint-steps",
            "20",
        )
        == 0
    )
    rows = read_log(out / "log.jsonl", "train")
    first, last = np.mean([r["mlm_loss"] for r in rows[:5]]), np.mean([r["mlm_loss"] for r in rows[-5:]])
    assert last < first - 0.5, (first, last)
    assert {"loss", "mlm_loss", "sop_loss", "mlm_acc", "sop_acc", "lr", "tokens_per_s"} <= set(rows[0])
    assert len(read_log(out / "log.jsonl", "valid")) >= 2 and read_log(out / "log.jsonl", "test")
    assert (out / "step-000020").is_dir() and (out / "step-000040").is_dir() and (out / "config.yaml").is_file()
    renamed = tmp_path / "model_ernie_micro_2400"  # the name that fooled the seed's folder-name guessing
    shutil.copytree(out / "step-000020", renamed)
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    assert type(AutoModel.from_pretrained(renamed)).__name__ == "BertModel"
    clf = AutoModelForSequenceClassification.from_pretrained(renamed, num_labels=3)
    assert clf.config.num_labels == 3
    assert AutoTokenizer.from_pretrained(renamed).mask_token == "[MASK]"


def test_ernie_3_config_and_headless_checkpoint_are_loaded_loudly(tmp_path, corpus_dir, tokenizer, capsys):
    ernie = save_tiny_model(tmp_path / "ernie", tokenizer, kind="ernie")
    assert pretrain(corpus_dir, ernie, tmp_path / "e", "--max-steps", "3") == 0
    headless = save_tiny_model(tmp_path / "headless", tokenizer, heads=False)
    assert pretrain(corpus_dir, headless, tmp_path / "h", "--max-steps", "2") == 0
    assert "no pretraining head weights" in capsys.readouterr().out


def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, corpus_dir, tiny_model, capsys):
    full = tmp_path / "full"
    flags = [
        "--max-steps",
        "8",
        "--checkpoint-steps",
        "4",
        "--keep-last",
        "0",
        "--eval-steps",
        "3",
        "--global-batch-size",
        "8",
        "--learning-rate",
        "1e-3",
    ]
    assert pretrain(corpus_dir, tiny_model, full, *flags) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000008")
    shutil.rmtree(resumed / "final")
    assert pretrain(corpus_dir, tiny_model, resumed, *flags) == 2  # no silent auto-resume
    assert "--resume auto" in capsys.readouterr().err
    assert pretrain(corpus_dir, tiny_model, resumed, *flags, "--resume", "auto") == 0
    a, b = read_log(full / "log.jsonl"), read_log(resumed / "log.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    from safetensors.torch import load_file

    wa, wb = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_damaged_checkpoint_is_skipped_and_a_full_disk_keeps_the_last_good_one(
    tmp_path, corpus_dir, tiny_model, capsys, monkeypatch
):
    out = tmp_path / "run"
    assert pretrain(corpus_dir, tiny_model, out, "--max-steps", "4", "--checkpoint-steps", "2", "--keep-last", "0") == 0
    (out / "checkpoints" / "step-000004" / "state.json").unlink()
    assert (
        pretrain(
            corpus_dir,
            tiny_model,
            out,
            "--max-steps",
            "6",
            "--checkpoint-steps",
            "2",
            "--keep-last",
            "0",
            "--resume",
            "auto",
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "skipping checkpoint" in captured.err and "step-000004" in captured.err and "at step 2" in captured.out
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if "step-000008" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)  # Accelerate's save_state writes optimizer state with torch.save
    assert (
        pretrain(
            corpus_dir,
            tiny_model,
            out,
            "--max-steps",
            "8",
            "--checkpoint-steps",
            "2",
            "--keep-last",
            "1",
            "--resume",
            "auto",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "step-000008: could not write: the disk is full" in err and "MB free there" in err and "step-000006" in err
    assert (out / "checkpoints" / "step-000006" / "manifest.json").is_file()
    assert not (out / "checkpoints" / ".step-000008.tmp").exists()


def test_bad_inputs(tmp_path, corpus_dir, tiny_model, capsys):
    def error(*args):
        assert main(["pretrain", *FAST, *args]) == 2
        return capsys.readouterr().err

    base = ["--corpus", corpus_dir, "--model", tiny_model, "--out", str(tmp_path / "o")]
    assert "is not a corpus store" in error(
        "--corpus", str(tmp_path), "--model", tiny_model, "--out", str(tmp_path / "o")
    )
    assert "exceeds what the model" in error(*base, "--max-seq-len", "128") and "(64 positions)" in error(
        *base, "--max-seq-len", "128"
    )
    assert "not a multiple of --batch-size 3" in error(*base, "--batch-size", "3", "--global-batch-size", "8")
    assert "--split '1,2'" in error(*base, "--split", "1,2")
    assert "above --learning-rate" in error(*base, "--min-lr", "0.1", "--learning-rate", "0.01")
    from domainlm.vocab import train_wordpiece

    other = tmp_path / "other-tok"
    train_wordpiece(["completely different words only"] * 5, other, vocab_size=200)
    assert "different vocabulary" in error(*base, "--tokenizer", str(other))
    assert "missing: no such folder" in error(
        "--corpus", corpus_dir, "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")
    )
    # a config without weights trains only on purpose
    cfg_only = tmp_path / "cfg-only"
    cfg_only.mkdir()
    shutil.copy(os.path.join(tiny_model, "config.json"), cfg_only)
    assert "no weights; pass --from-scratch" in error(
        "--corpus", corpus_dir, "--model", str(cfg_only), "--out", str(tmp_path / "o")
    )
    # encoder weights missing from a checkpoint: refuse rather than train from random weights
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = load_file(broken / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "layer.1." not in k},
        broken / "model.safetensors",
        metadata={"format": "pt"},
    )
    assert "encoder weights are missing" in error(
        "--corpus", corpus_dir, "--model", str(broken), "--out", str(tmp_path / "o")
    )
    # resume with another global batch
    run = tmp_path / "run"
    assert pretrain(corpus_dir, tiny_model, run, "--max-steps", "2", "--global-batch-size", "8") == 0
    assert "global batch 8" in error(
        "--corpus",
        corpus_dir,
        "--model",
        tiny_model,
        "--out",
        str(run),
        "--max-steps",
        "4",
        "--global-batch-size",
        "4",
        "--resume",
        "auto",
    )
    assert "cannot resume from" in error(*base, "--resume", str(tmp_path / "nope"))


def test_extend_vocabulary_initialises_new_rows_from_their_pieces(tmp_path, tiny_model, zh_txt, capsys):
    terms = tmp_path / "terms.txt"
    terms.write_text("# domain terms\n验收批次\n酒店\n", encoding="utf-8")
    out = tmp_path / "extended"
    assert main(["extend-vocab", "--model", tiny_model, "--tokens", str(terms), "--out", str(out)]) == 0
    assert "2 tokens added" in capsys.readouterr().out
    from transformers import AutoModelForPreTraining, AutoTokenizer

    old_tok, tok = AutoTokenizer.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(old_tok) + 2 and "验收批次" in tok.tokenize("本验收批次合格")
    old = AutoModelForPreTraining.from_pretrained(tiny_model).get_input_embeddings().weight
    new = AutoModelForPreTraining.from_pretrained(out).get_input_embeddings().weight
    pieces = old_tok("验收批次", add_special_tokens=False)["input_ids"]
    assert torch.allclose(new[tok.convert_tokens_to_ids("验收批次")], old[pieces].mean(0))
    assert torch.equal(new[: len(old_tok)], old[: len(old_tok)])
    # the corpus is prepared again with the new tokenizer; the added token is one id there
    assert main(["prepare", str(zh_txt), "--tokenizer", str(out), "--out", str(tmp_path / "c"), "--workers", "0"]) == 0
    assert tok.convert_tokens_to_ids("酒店") in np.asarray(Corpus(tmp_path / "c").tokens).tolist()


def test_unpadded_run_trains_to_the_same_losses_as_the_padded_one(tmp_path, corpus_dir, tokenizer):
    """10 steps on the packed stream and 10 on padded batches, same seed, no dropout (its masks are drawn per
    position, so they differ by layout): the same losses, step by step (in fp32: bf16 rounds the two layouts'
    sums in another order)."""
    model_dir = save_tiny_model(tmp_path / "nodrop", tokenizer, dropout=0.0)
    runs = {}
    for name, flags in {"packed": [], "padded": ["--no-unpad"]}.items():
        assert (
            pretrain(
                corpus_dir,
                str(model_dir),
                tmp_path / name,
                "--max-steps",
                "10",
                "--learning-rate",
                "3e-3",
                "--eval-steps",
                "5",
                "--precision",
                "fp32",
                *flags,
            )
            == 0
        )
        runs[name] = read_log(tmp_path / name / "log.jsonl")
    for a, b in zip(runs["packed"], runs["padded"]):
        assert (a["step"], a["split"]) == (b["step"], b["split"])
        for key in ("mlm_loss", "sop_loss", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], a["split"], key)
    assert len(runs["packed"]) == len(runs["padded"]) >= 12
