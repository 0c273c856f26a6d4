"""YAML configs as people write them: YAML 1.1 booleans where a word is expected."""

import pytest

from domainlm import config as cfglib
from domainlm.classify.config import FinetuneConfig
from domainlm.errors import DomainLMError
from domainlm.pretrain.config import PretrainConfig


def load(tmp_path, cls, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return cfglib.load(cls, str(path))


def test_unquoted_no_off_where_a_choice_is_meant(tmp_path):
    base = "corpus: c\nout: o\nmodel: m\n"
    assert load(tmp_path, PretrainConfig, base + "precision: no\n").precision == "fp32"  # the old word for fp32
    assert load(tmp_path, PretrainConfig, base + "precision: 'no'\nbinary_head: off\n").binary_head is False
    with pytest.raises(
        DomainLMError,
        match=r"c\.yaml: precision: YAML reads an unquoted yes/on/true as the boolean "
        r"true, which is not one of auto, fp32, bf16, fp16; write the choice in quotes",
    ):
        load(tmp_path, PretrainConfig, base + "precision: on\n")
    with pytest.raises(DomainLMError, match="not one of linear, cosine"):
        load(tmp_path, PretrainConfig, base + "lr_decay: off\n")


def test_unquoted_yes_no_where_text_is_meant(tmp_path):
    base = "train: t.csv\nout: o\nmodel: m\n"
    with pytest.raises(
        DomainLMError,
        match=r"labels: YAML reads an unquoted yes/on/true as the boolean true, not as "
        r'text; write the text in quotes, e.g. "yes"',
    ):
        load(tmp_path, FinetuneConfig, base + "labels: [yes, no]\n")
    assert load(tmp_path, FinetuneConfig, base + "labels: ['yes', 'no']\n").labels == ["yes", "no"]
    with pytest.raises(DomainLMError, match=r"text_column: YAML reads an unquoted no/off/false"):
        load(tmp_path, FinetuneConfig, base + "text_column: off\n")
