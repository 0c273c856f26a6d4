"""The encoder's layers packed for CPU inference (encoder.frozen) compute what the modules compute: equal in fp32,
within bf16's rounding of the autocast forward in bf16; the runtime uses them on a CPU and not where they do not
apply."""

from __future__ import annotations

import unittest.mock

import numpy as np
import pytest
import torch

from domainlm.classify.runtime import TorchRuntime
from domainlm.encoder import frozen
from domainlm.encoder.packed import encode_batch, pack_padded
from tests.test_export import trained  # noqa: F401 - shared session fixture
from tests.test_packed_encoder import _model, _ragged
from tests.test_runtime import TEXTS

pytestmark = pytest.mark.skipif(not frozen.available(), reason="this PyTorch has no oneDNN (mkldnn) linear ops")
needs_bf16 = pytest.mark.skipif(
    not frozen.runs(torch.bfloat16), reason="oneDNN runs no bf16 products on this CPU (it needs AVX-512 or AMX)"
)


def _batch(lengths=(7, 1, 40, 3, 12)):
    ids, mask, types = _ragged(list(lengths))
    return pack_padded(ids, mask, types)


@pytest.mark.parametrize("kind", ["bert", "ernie", "roberta"])
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_frozen_layers_equal_the_modules_in_fp32(kind, act):
    from transformers.activations import ACT2FN

    model = _model(kind).eval()
    model.config.hidden_act = act
    for layer in model.encoder.layer:  # the modules took the activation when built: give them this one
        layer.intermediate.intermediate_act_fn = ACT2FN[act]
    packed = frozen.freeze(model, torch.float32)
    assert packed is not None and len(packed.layers) == 2
    batch = _batch()
    with torch.inference_mode():
        want = encode_batch(model, batch)
        got = encode_batch(model, batch, frozen=packed)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        # the first layer alone (the classifier runs the layers below its last)
        torch.testing.assert_close(
            encode_batch(model, batch, depth=1, frozen=packed), encode_batch(model, batch, depth=1), atol=2e-5, rtol=0
        )


@needs_bf16
def test_frozen_layers_in_bf16_are_the_autocast_forward_within_its_rounding():
    model = _model("bert").eval()
    packed = frozen.freeze(model, torch.bfloat16)
    batch = _batch()
    with torch.inference_mode():
        exact = encode_batch(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = encode_batch(model, batch).float()
            got = encode_batch(model, batch, frozen=packed)
    assert got.dtype == torch.bfloat16
    # LayerNorm'd states of unit scale: the frozen bf16 forward is as far from fp32 as autocast's is, no further
    autocast_error = (autocast - exact).abs().max().item()
    error = (got.float() - exact).abs().max().item()
    assert 0 < error < max(3 * autocast_error, 0.05), (error, autocast_error)


def test_freeze_declines_what_it_does_not_run():
    model = _model("bert").eval()
    model.config.hidden_act = "silu"  # no fused oneDNN activation mapped: the modules run
    assert frozen.freeze(model, torch.float32) is None
    model.config.hidden_act = "gelu"
    assert frozen.freeze(model, torch.float16) is None  # bf16 and fp32 only
    assert (frozen.freeze(model, torch.bfloat16) is not None) == frozen.runs(torch.bfloat16)


def test_the_cpu_runtime_runs_frozen_layers_with_the_modules_answers(trained):  # noqa: F811
    rt = TorchRuntime(str(trained["ft"]), precision="fp32")
    assert rt.frozen is not None and rt.frozen.dtype == torch.float32
    got = rt.predict(TEXTS, batch_size=3, max_seq_len=32)
    rt.frozen = None
    want = rt.predict(TEXTS, batch_size=3, max_seq_len=32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    if not frozen.runs(torch.bfloat16):
        return
    rt = TorchRuntime(str(trained["ft"]), precision="bf16")
    assert rt.frozen is not None and rt.frozen.dtype == torch.bfloat16
    bf16 = rt.predict(TEXTS, batch_size=3, max_seq_len=32)
    assert np.abs(bf16 - want).max() < 0.02 and (bf16.argmax(1) == want.argmax(1)).all()


def test_freeze_checks_its_first_layer_against_the_module(monkeypatch):
    """A packing that computes anything else (here: weights off by half, or the tanh GELU for the erf one in fp32)
    is found at load time: the modules run."""
    model = _model("bert").eval()
    product = frozen._product
    monkeypatch.setattr(frozen, "_product", lambda weight, bias, dtype: product(weight * 1.5, bias, dtype))
    assert frozen.freeze(model, torch.float32) is None
    if frozen.runs(torch.bfloat16):
        assert frozen.freeze(model, torch.bfloat16) is None
    monkeypatch.setattr(frozen, "_product", product)
    assert frozen.freeze(model, torch.float32) is not None
    monkeypatch.setitem(frozen.ACTIVATIONS, "gelu", ("gelu", "tanh"))
    assert frozen.freeze(model, torch.float32) is None


def test_fine_tuning_evaluates_with_the_packed_layers_and_trains_without(trained):  # noqa: F811
    """Inside `inference_layers` a classifier's evaluation is the runtime's forward (the scores finetune reports are
    predict's); in training mode, and after the block, the modules run."""
    from domainlm.classify.model import Classifier, inference_layers

    rt = TorchRuntime(str(trained["ft"]), precision="fp32")
    batch = rt.feed(rt.encode(TEXTS, max_seq_len=32))
    classifier = Classifier(rt.model, multilabel=False).eval()
    with torch.inference_mode():
        want = rt.logits(batch)
        with inference_layers(classifier, torch.float32):
            assert classifier.frozen is not None
            packed = classifier.frozen.layers[0].qkv.weight
            torch.testing.assert_close(classifier.batch_logits(batch), want, atol=0, rtol=0)
            classifier.train()
            with unittest.mock.patch.object(type(classifier.frozen), "__call__", side_effect=AssertionError):
                classifier.batch_logits(batch)  # training: the modules, never the packed layers
            classifier.eval()
        assert classifier.frozen is None and packed.dtype == torch.float32
        with inference_layers(classifier, None):  # a GPU, fp16, sharded weights: nothing packed
            assert classifier.frozen is None


def test_fine_tuning_packs_its_evaluations_at_the_run_precision_on_a_cpu():
    from types import SimpleNamespace

    from domainlm.classify.command import Run
    from domainlm.train.setup import make_accelerator

    run = SimpleNamespace(accelerator=make_accelerator("fp32"))
    assert Run.inference_dtype(run) == torch.float32
    run.accelerator = SimpleNamespace(device=torch.device("cpu"), distributed_type="NO", mixed_precision="bf16")
    assert Run.inference_dtype(run) == torch.bfloat16
    run.accelerator.device = torch.device("cuda")  # a GPU: the modules (no device is used here)
    assert Run.inference_dtype(run) is None
