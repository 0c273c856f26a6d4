"""Corpus split for small corpora (sentence blocks), memory-mapped sample index and epoch order."""

import json
import pickle

import numpy as np
import pytest

from domainlm.cli import main
from domainlm.data.store import Corpus
from domainlm.errors import DomainLMError
from domainlm.pretrain import samples as S
from domainlm.pretrain.dataset import PretrainDataset
from domainlm.pretrain.masking import MaskingOptions
from tests.conftest import ZH_DOCS

SENTENCES = [s + "。" for d in ZH_DOCS for s in d.replace("！", "。").replace("；", "。").split("。") if s]


def make_corpus(tmp_path, tokenizer_dir, n_docs: int, sentences_per_doc: int):
    """n_docs documents (blank-line separated), sentences cycled from the sample texts."""
    from domainlm.data.prepare import PrepareConfig, prepare

    src = tmp_path / f"docs-{n_docs}.txt"
    docs = ["\n".join(SENTENCES[(d * 7 + i) % len(SENTENCES)] for i in range(sentences_per_doc)) for d in range(n_docs)]
    src.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = tmp_path / f"store-{n_docs}"
    prepare(
        PrepareConfig(
            input=[str(src)], out=str(out), tokenizer=tokenizer_dir, workers=0, segment=True, near_dup_threshold=0
        ),
        progress=False,
    )
    corpus = Corpus(out)
    assert corpus.n_documents == n_docs
    return corpus


def split_labels(corpus, split):
    """Which split owns each sentence (-1: none); fails on a sentence owned twice."""
    owner = np.full(corpus.n_sentences, -1)
    for code, name in enumerate(S.SPLITS):
        for first, end in split.ranges[name]:
            assert (owner[first:end] == -1).all(), f"sentences {first}..{end} of {name} are in two splits"
            owner[first:end] = code
    return owner


@pytest.mark.parametrize("n_docs", [1, 3])
def test_too_few_documents_hold_out_sentence_blocks_disjointly(tmp_path, tokenizer_dir, n_docs):
    corpus = make_corpus(tmp_path, tokenizer_dir, n_docs, 60 // n_docs)
    split = S.split_corpus(corpus, S.parse_split("98,1,1"), seed=1, max_tokens=45, min_sentences=2)
    assert split.by == "sentence-blocks"
    assert f"the corpus has {n_docs} document(s): too few to split 98,1,1 by documents" in split.message
    assert "no sentence is in two splits" in split.message
    owner = split_labels(corpus, split)
    assert (owner >= 0).all()  # every sentence is used by exactly one split
    k = split.details["block_sentences"]
    assert k >= 2
    for name in ("valid", "test"):
        assert len(split.ranges[name]) == 1 and (np.diff(split.ranges[name], axis=1) == k).all()
    doc_of = np.searchsorted(np.asarray(corpus.document_offsets), np.arange(corpus.n_sentences), side="right") - 1
    for first, end in split.ranges["train"]:  # training runs never cross a document border
        assert doc_of[first] == doc_of[end - 1]
    # the samples of each split stay inside its ranges, so no sentence is read by two splits
    for name in S.SPLITS:
        samples, _ = S.build_samples(corpus, split.ranges[name], 45, 0.1 if name == "train" else 0.0, 2, seed=1)
        assert len(samples)
        assert all((owner[a:b] == S.SPLITS.index(name)).all() for a, b in samples)
    # deterministic for a seed, different for another
    again = S.split_corpus(corpus, S.parse_split("98,1,1"), seed=1, max_tokens=45, min_sentences=2)
    assert all(np.array_equal(again.ranges[n], split.ranges[n]) for n in S.SPLITS)


def test_enough_documents_keep_the_document_split(corpus_dir):
    corpus = Corpus(corpus_dir)
    split = S.split_corpus(corpus, S.parse_split("98,1,1"), seed=3, max_tokens=45, min_sentences=2)
    docs = S.split_documents(corpus.n_documents, S.parse_split("98,1,1"), seed=3)
    assert split.by == "documents" and split.message == ""
    for name in S.SPLITS:
        assert np.array_equal(split.ranges[name], S.document_ranges(corpus, docs[name]))
        # ranges and document ids give the same index: the data order of existing runs is unchanged
        a, _ = S.build_samples(corpus, docs[name], 40, 0.1, 2, seed=3)
        b, _ = S.build_samples(corpus, split.ranges[name], 40, 0.1, 2, seed=3)
        assert np.array_equal(a, b)


def test_a_corpus_too_small_even_for_blocks_names_the_flag(tmp_path, tokenizer_dir):
    corpus = make_corpus(tmp_path, tokenizer_dir, 1, 3)
    with pytest.raises(DomainLMError, match=r"too few to hold out valid and test .* use --split 100,0,0"):
        S.split_corpus(corpus, S.parse_split("98,1,1"), seed=1, max_tokens=45, min_sentences=2)
    assert S.split_corpus(corpus, S.parse_split("100,0,0"), seed=1, max_tokens=45, min_sentences=2).by == "documents"


@pytest.mark.parametrize("n_docs", [1, 3])
def test_pretrain_on_a_small_corpus_runs_with_the_default_split(tmp_path, tokenizer_dir, tiny_model, capsys, n_docs):
    corpus = make_corpus(tmp_path, tokenizer_dir, n_docs, 60 // n_docs)
    out = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--corpus",
                str(corpus.path),
                "--model",
                tiny_model,
                "--out",
                str(out),
                "--max-steps",
                "2",
                "--max-seq-len",
                "48",
                "--batch-size",
                "4",
                "--num-workers",
                "0",
                "--no-tensorboard",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"split: the corpus has {n_docs} document(s): too few to split 98,1,1 by documents" in printed
    data = json.loads((out / "data.json").read_text())
    assert data["split"]["by"] == "sentence-blocks"
    assert sum(data["split"]["sentences"].values()) == corpus.n_sentences
    assert data["samples"]["valid"]["samples"] >= 1 and data["samples"]["test"]["samples"] >= 1
    results = json.loads((out / "results.json").read_text())
    assert np.isfinite(results["valid"]["loss"]) and np.isfinite(results["test"]["loss"])


def test_sample_index_is_memory_mapped_and_shared_by_path(tmp_path, corpus_dir, tokenizer):
    corpus = Corpus(corpus_dir)
    ranges = S.split_corpus(corpus, S.parse_split("90,5,5"), seed=2).ranges["train"]
    built, report = S.build_samples(corpus, ranges, 40, 0.1, 2, seed=2)
    cached, cached_report = S.cached_samples(corpus, "train", ranges, 40, 0.1, 2, seed=2)
    again, _ = S.cached_samples(corpus, "train", ranges, 40, 0.1, 2, seed=2)
    assert isinstance(cached, np.memmap) and isinstance(again, np.memmap) and not cached.flags.writeable
    assert np.array_equal(built, cached) and np.array_equal(built, again) and report == cached_report
    special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "mask": tokenizer.mask_token_id}
    ds = PretrainDataset(corpus, again, "train", 48, True, MaskingOptions(), special, len(tokenizer), 0, True)
    blob = pickle.dumps(ds)
    in_memory = PretrainDataset(
        corpus, np.array(again), "train", 48, True, MaskingOptions(), special, len(tokenizer), 0, True
    )
    assert len(blob) < len(pickle.dumps(in_memory)) - built.nbytes + 200  # a worker gets the path, not a copy
    copy = pickle.loads(blob)
    assert isinstance(copy.samples, np.memmap) and str(copy.samples.filename) == str(again.filename)
    assert np.array_equal(copy.samples, built)
    for g in (0, 5, len(ds) + 3):
        assert all(np.array_equal(ds[g][k], copy[g][k]) for k in ds[g])


def test_epoch_order_is_shared_from_the_cache_with_identical_values(tmp_path):
    n = S.SHARED_ORDER_MIN + 5
    shared = S.cached_epoch_order(tmp_path, n, seed=4, epoch=2)
    assert isinstance(shared, np.memmap) and np.array_equal(shared, S.epoch_order(n, 4, 2))
    assert np.array_equal(S.cached_epoch_order(tmp_path, n, seed=4, epoch=2), shared)
    assert not np.array_equal(S.cached_epoch_order(tmp_path, n, seed=4, epoch=3), shared)
    small = S.cached_epoch_order(tmp_path, 50, seed=4, epoch=2)  # small: in memory, no file
    assert not isinstance(small, np.memmap) and np.array_equal(small, S.epoch_order(50, 4, 2))
    assert len(list(tmp_path.glob("order-*.npy"))) == 2
