"""The classifier's forward computes the last layer for [CLS] only: same logits and gradients as the full model."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ErnieConfig,
    ErnieForSequenceClassification,
)

from domainlm.classify.model import _cls_only_ready, classifier_logits


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 2:] = 0  # padding, and a row with a single real token after [CLS]
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return ids, mask, types


@pytest.mark.parametrize("kind", ["bert", "ernie"])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # a boolean mask, an additive one
def test_cls_only_forward_matches_the_full_model_in_logits_and_gradients(kind, padded, attention):
    torch.manual_seed(0)
    shape = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        attn_implementation=attention,
    )
    model = (
        BertForSequenceClassification(BertConfig(**shape))
        if kind == "bert"
        else ErnieForSequenceClassification(ErnieConfig(**shape))
    )
    assert _cls_only_ready(model)
    ids, mask, types = _batch()
    if not padded:
        mask = torch.ones_like(mask)
    model.train()
    full = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    full.pow(2).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fast = classifier_logits(model, ids, mask, types)
    fast.pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_models_outside_the_bert_layout_run_their_own_forward():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=2)
    ).eval()
    assert not _cls_only_ready(model)
    ids, mask, _ = _batch()
    torch.testing.assert_close(classifier_logits(model, ids, mask), model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("kind,layers", [("bert", 3), ("ernie", 3), ("bert", 1)])  # 1: the [CLS] layer alone
def test_packed_classifier_matches_the_padded_one_in_loss_and_gradients(kind, layers):
    from domainlm.classify.model import Classifier, packing_ready
    from domainlm.encoder.packed import pack_padded

    torch.manual_seed(0)
    shape = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    hf = (
        BertForSequenceClassification(BertConfig(**shape))
        if kind == "bert"
        else ErnieForSequenceClassification(ErnieConfig(**shape))
    )
    assert packing_ready(hf)
    model = Classifier(hf, multilabel=False).train()
    ids, mask, types = _batch()
    labels = torch.tensor([0, 2, 1, 2])
    loss, _ = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    packed = pack_padded(ids, mask, types)
    assert packed["input_ids"].numel() == int(mask.sum())  # no padded position left
    loss2, metrics = model(**packed, labels=labels)
    loss2.backward()
    torch.testing.assert_close(loss2, loss, atol=1e-6, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)
