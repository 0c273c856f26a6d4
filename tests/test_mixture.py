"""Several corpora in one pretraining run, drawn by weight: the blend (shares exact within every period, any sample
found from its number), each corpus keeping its own split, index and order, the loss per corpus, the samples and tokens
drawn from each, resume, the sweep's pretrain section; one corpus alone runs as before."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from domainlm.cli import build_parser, main
from domainlm.errors import DomainLMError
from domainlm.pretrain import mixture
from domainlm.pretrain.mixture import Blend, specs, whole_weights
from domainlm.train.logging import read_log
from domainlm.train.loop import ratios
from tests.conftest import make_documents, one_line

FLAGS = [
    "--max-seq-len",
    "48",
    "--batch-size",
    "4",
    "--global-batch-size",
    "8",
    "--logging-freq",
    "1",
    "--eval-iters",
    "2",
    "--test-iters",
    "2",
    "--num-workers",
    "0",
    "--no-tensorboard",
    "--precision",
    "fp32",
    "--learning-rate",
    "1e-3",
]


@pytest.fixture(scope="module")
def second_corpus(tmp_path_factory, tokenizer_dir):
    from domainlm.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("second")
    src = root / "other.txt"
    src.write_text("\n\n".join(make_documents(40, seed=5)), encoding="utf-8")
    prepare(
        PrepareConfig(
            input=[str(src)],
            out=str(root / "domain"),
            tokenizer=tokenizer_dir,
            workers=0,
            segment=True,
            near_dup_threshold=0,
        ),
        progress=False,
    )
    return str(root / "domain")


# ---- the blend ---------------------------------------------------------------------------------------------------


def test_weights_become_the_smallest_whole_numbers_in_the_same_ratio():
    assert whole_weights([0.3, 0.7]) == [3, 7]
    assert whole_weights([1, 2]) == [1, 2]
    assert whole_weights([0.25, 0.25, 0.5]) == [1, 1, 2]
    assert whole_weights([2.5, 7.5]) == [1, 3]
    blend = Blend([0.3, 0.7])
    assert blend.period == 10 and blend.corpus.tolist() == [
        1,
        0,
        1,
        1,
        0,
        1,
        1,
        1,
        0,
        1,
    ]  # 0 at 1/6, 3/6, 5/6; 1 at 1/14, 3/14, ...; a tie: 0 first


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 40), min_size=2, max_size=4))
def test_every_prefix_holds_each_corpus_within_one_sample_of_its_share(weights):
    blend = Blend([float(w) for w in weights])
    share = [Fraction(w, sum(weights)) for w in weights]
    seen = [[] for _ in weights]
    for g in range(3 * blend.period):
        k, j = blend.locate(g)
        seen[k].append(j)
        counts = blend.counts(g + 1)
        assert all(abs(c - s * (g + 1)) < 1 for c, s in zip(counts, share)), (g, counts)
    # each corpus's own samples, in its own order, none skipped or repeated
    assert all(s == list(range(len(s))) for s in seen)


def test_corpora_are_read_from_flags_and_yaml(tmp_path):
    args = build_parser().parse_args(
        ["pretrain", "--corpus", "a:0.3", "--corpus", "b:0.7", "--model", "m", "--out", "o"]
    )
    assert args.corpus == ["a:0.3", "b:0.7"]
    assert build_parser().parse_args(["pretrain", "--corpus", "a", "--model", "m", "--out", "o"]).corpus == "a"
    chosen = specs(["general:0.3", {"path": "x/domain", "weight": 7}, "y/domain:1e-1"])
    assert [(s.path, s.weight, s.name) for s in chosen] == [
        ("general", 0.3, "general"),
        ("x/domain", 7.0, "domain"),
        ("y/domain", 0.1, "domain-2"),
    ]
    folder = tmp_path / "odd:2"
    folder.mkdir()
    assert [(s.path, s.weight) for s in specs(str(folder))] == [(str(folder), 1.0)]  # a folder is a folder
    for value, message in (
        (["a:0", "b"], "the weight of a must be a positive number, got 0.0"),
        (["a:nan", "b"], "the weight of a must be a positive number, got nan"),
        (["a:1", "./a:2"], "a is given twice"),
        ([{"path": "a", "share": 1}], "a corpus given as a mapping has `path` and an optional"),
    ):
        with pytest.raises(DomainLMError, match=message):
            specs(value)


def test_the_loss_per_corpus_is_the_mean_over_its_own_tokens(tiny_model, tokenizer):
    """Per corpus, the model gives a sum and a count; their ratio is the loss over that corpus's masked tokens."""
    from transformers import AutoModelForPreTraining

    from domainlm.pretrain.dataset import collate, collate_packed
    from domainlm.pretrain.model import PretrainingModel

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    items = []
    for i, n in enumerate((9, 14, 6, 11)):
        ids = rng.integers(5, len(tokenizer), n)
        labels = np.where(rng.random(n) < 0.4, ids, -100)
        labels[1] = ids[1]
        items.append(
            {
                "input_ids": ids,
                "token_type_ids": np.zeros(n, np.int64),
                "labels": labels,
                "sop_labels": np.int64(i % 2),
                "source": np.int64([0, 1, 1, 0][i]),
            }
        )
    model = PretrainingModel(AutoModelForPreTraining.from_pretrained(tiny_model), True, ["a", "b"]).eval()
    for batch in (collate(items, tokenizer.pad_token_id), collate_packed(items)):
        with torch.no_grad():
            _, metrics = model(**batch)
        got = ratios({k: float(v) for k, v in metrics.items()})
        plain = PretrainingModel(model.hf, True).eval()
        for k, name in enumerate("ab"):
            alone = [x for x in items if int(x["source"]) == k]
            one = collate(alone, tokenizer.pad_token_id)
            with torch.no_grad():
                _, expected = plain(**one)
            assert got[f"mlm_loss/{name}"] == pytest.approx(float(expected["mlm_loss"]), rel=1e-5)
            assert got[f"sop_loss/{name}"] == pytest.approx(float(expected["sop_loss"]), rel=1e-5)
    assert ratios({"x#sum": 3.0, "x#count": 0.0, "y": 1.0}) == {"y": 1.0}  # no token of a corpus: no value


# ---- pretraining on two corpora ------------------------------------------------------------------------------------


def test_two_corpora_by_weight_loss_and_tokens_per_corpus_and_resume(tmp_path, corpus_dir, second_corpus, tiny_model):
    corpora = ["--corpus", f"{corpus_dir}:0.3", "--corpus", f"{second_corpus}:0.7"]
    flags = [
        "pretrain",
        *corpora,
        "--model",
        tiny_model,
        *FLAGS,
        "--max-steps",
        "6",
        "--checkpoint-steps",
        "3",
        "--eval-steps",
        "3",
        "--keep-last",
        "0",
    ]
    full = tmp_path / "full"
    assert main([*flags, "--out", str(full)]) == 0
    names = ["store", "domain"]
    log = read_log(full / "log.jsonl")
    for row in log:
        assert all(f"mlm_loss/{n}" in row and f"sop_loss/{n}" in row for n in names), row
    results = json.loads((full / "results.json").read_text())
    assert all(f"mlm_loss/{n}" in results["valid"] for n in names)
    drawn = results["corpora"]
    assert [drawn[n]["samples"] for n in names] == Blend([0.3, 0.7]).counts(6 * 8) == [14, 34]
    # tokens: what the two corpora's own orders give for their first 14 and 34 samples
    from domainlm.data.store import Corpus
    from domainlm.pretrain.samples import cached_epoch_order

    for name, path, n in zip(names, (corpus_dir, second_corpus), (14, 34)):
        corpus = Corpus(path)
        data = json.loads((full / "data.json").read_text())["corpora"][name]
        index = next(
            np.load(p)
            for p in (corpus.path / "cache").glob("samples-train-*.npy")
            if len(np.load(p)) == data["samples"]["train"]["samples"]
        )
        order = np.concatenate([cached_epoch_order(None, len(index), 1234, e) for e in range(n // len(index) + 1)])
        picked = index[order[:n]]
        lengths = np.asarray(corpus.sentence_offsets)[picked[:, 1]] - np.asarray(corpus.sentence_offsets)[picked[:, 0]]
        assert drawn[name]["tokens"] == int(np.minimum(lengths, 48 - 3).sum())
        assert data["weight"] in (0.3, 0.7) and data["splits"]["train"] > 0
    # resumed from the step-3 checkpoint: the same data order, losses and weights
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    shutil.rmtree(resumed / "final")
    assert main([*flags, "--out", str(resumed), "--resume", "auto"]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(read_log(resumed / "log.jsonl")) == strip(log)
    from safetensors.torch import load_file

    wa, wb = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((resumed / "results.json").read_text())["corpora"] == drawn


def test_each_corpus_is_drawn_in_its_own_order(corpus_dir, second_corpus, tiny_model, tokenizer):
    """The blended training set's samples of one corpus are that corpus's own samples, in its own order."""
    from domainlm.data.store import Corpus
    from domainlm.pretrain.config import PretrainConfig
    from domainlm.pretrain.masking import MaskingOptions
    from domainlm.pretrain.samples import cached_samples, document_ranges, split_documents

    cfg = PretrainConfig(corpus=[f"{corpus_dir}:1", f"{second_corpus}:2"], model=tiny_model, out="x", max_seq_len=48)

    def one(corpus):
        from domainlm.pretrain.dataset import PretrainDataset

        docs = split_documents(corpus.n_documents, (1.0, 0.0, 0.0), 1)["train"]
        samples, report = cached_samples(corpus, "train", document_ranges(corpus, docs), 45, 0.1, 2, 1)
        special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "mask": tokenizer.mask_token_id}
        ds = PretrainDataset(
            corpus,
            samples,
            "train",
            48,
            True,
            MaskingOptions(0.15, 7, 3, False, True),
            special,
            len(tokenizer),
            1,
            shuffle=True,
        )
        return {"train": ds}, {"train": {**report, "documents": len(docs)}}, None

    mix = mixture.build(cfg, [Corpus(corpus_dir), Corpus(second_corpus)], one)
    blended = mix.datasets()["train"]
    drawn = [0, 0]
    for g in range(60):
        item = blended[g]
        k = int(item.pop("source"))
        # the next sample of that corpus's own order (its masks draw from the run's sample number g)
        own = mix.per_corpus[k]["train"].item(drawn[k], key=g)
        assert all(np.array_equal(item[key], own[key]) for key in own)
        drawn[k] += 1
    assert drawn == [20, 40]


def test_one_corpus_runs_as_before(tmp_path, corpus_dir, tiny_model):
    """`--corpus X:1` is one corpus: the same log, data order and data.json as `--corpus X`."""
    for name, corpus in (("plain", corpus_dir), ("weighted", f"{corpus_dir}:1")):
        assert (
            main(
                [
                    "pretrain",
                    "--corpus",
                    corpus,
                    "--model",
                    tiny_model,
                    *FLAGS,
                    "--max-steps",
                    "2",
                    "--out",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(read_log(tmp_path / "plain" / "log.jsonl")) == strip(read_log(tmp_path / "weighted" / "log.jsonl"))
    data = json.loads((tmp_path / "plain" / "data.json").read_text())
    assert list(data) == ["splits", "split", "samples", "accumulation", "processes"]
    assert "corpora" not in json.loads((tmp_path / "plain" / "results.json").read_text())


def test_bad_corpora_are_one_line(tmp_path, corpus_dir, tiny_model, err):
    base = ["pretrain", "--model", tiny_model, "--out", tmp_path / "run", *FLAGS]
    line = one_line(err(*base, "--corpus", f"{corpus_dir}:0.5", "--corpus", f"{tmp_path / 'none'}:0.5"))
    assert (
        line == f"error: {tmp_path / 'none'} is not a corpus store (no meta.json); create one with `domainlm prepare`\n"
    )
    line = one_line(err(*base, "--corpus", f"{corpus_dir}:-1", "--corpus", corpus_dir))
    assert line == f"error: --corpus: the weight of {corpus_dir} must be a positive number, got -1.0\n"
    assert not (tmp_path / "run").exists()


def test_the_sweep_pretrain_section_takes_several_corpora(tmp_path, corpus_dir):
    from domainlm.sweep.config import ModelSpec, SweepConfig, pretrain_config

    spec = ModelSpec(
        name="m",
        base="b",
        pretrain={"corpus": [f"{corpus_dir}:0.3", f"{tmp_path / 'nowhere'}:0.7"], "max_steps": 4, "save_steps": 2},
    )
    cfg = SweepConfig(out=str(tmp_path / "sweep"), models=[spec], finetune={"train": "t"})
    with pytest.raises(DomainLMError, match=f"pretrain: corpus {tmp_path / 'nowhere'} is not a folder"):
        pretrain_config(cfg, spec)
    spec.pretrain["corpus"] = [f"{corpus_dir}:0.3", {"path": corpus_dir + "/../store", "weight": 1}]
    with pytest.raises(DomainLMError, match="is given twice"):
        pretrain_config(cfg, spec)
    spec.pretrain["corpus"] = [f"{corpus_dir}:0.3", f"{corpus_dir}:0.7"]
    with pytest.raises(DomainLMError, match="is given twice"):
        pretrain_config(cfg, spec)
