"""The packed (unpadded) encoder forward equals the HF padded one: outputs, gradients, MLM loss, ids per sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from domainlm.encoder.attention import Layout, _bmm_attention, bmm_usable, flash_usable, packed_attention
from domainlm.encoder.packed import encode_packed, first_tokens, pack, pack_padded, supports_packing, unpack

ATOL = 2e-5  # fp32: the two forwards differ only in summation order


def _model(kind: str):
    from transformers import BertConfig, BertModel, ErnieConfig, ErnieModel, RobertaConfig, RobertaModel

    torch.manual_seed(0)
    shape = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if kind == "ernie":
        return ErnieModel(ErnieConfig(**shape, type_vocab_size=4, use_task_id=True, task_type_vocab_size=3))
    if kind == "roberta":
        return RobertaModel(
            RobertaConfig(**{**shape, "max_position_embeddings": 42}, pad_token_id=1)
        )  # positions from 2
    return BertModel(BertConfig(**shape, type_vocab_size=2))


def _ragged(lengths, vocab=97, seed=0):
    """A right-padded batch with these lengths (one-token samples and the longest included by the callers)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    types = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        types[i, n // 2 : n] = 1
    ids = ids * mask + 1 * (1 - mask)  # pad id 1 (RoBERTa's)
    return ids, mask, types * mask


@pytest.mark.parametrize("kind", ["bert", "ernie", "roberta"])
def test_packed_forward_and_gradients_equal_padded(kind):
    model = _model(kind).eval()
    assert supports_packing(model)
    lengths = [7, 1, 40, 3, 12]  # a one-token sample and one at the position limit
    ids, mask, types = _ragged(lengths)
    padded = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    packed = pack_padded(ids, mask, types)
    assert packed["max_len"] == 40 and packed["cu_seqlens"].tolist() == [0, 7, 8, 48, 51, 63]
    hidden = encode_packed(
        model,
        **{k: packed[k] for k in ("input_ids", "token_type_ids", "position_ids", "seq_index", "cu_seqlens", "max_len")},
    )
    assert hidden.shape == (sum(lengths), 32)
    real = mask.bool()
    torch.testing.assert_close(hidden, padded[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(unpack(hidden, packed)[real], padded[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(first_tokens(hidden, packed["cu_seqlens"]), padded[:, 0], atol=ATOL, rtol=0)

    # gradients of the same loss on the real positions, parameter by parameter
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    (padded[real] * weights).sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    hidden = encode_packed(
        model,
        **{k: packed[k] for k in ("input_ids", "token_type_ids", "position_ids", "seq_index", "cu_seqlens", "max_len")},
    )
    (hidden * weights).sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(reference) - {n for n in reference if "pooler" in n}
    for name, grad in got.items():
        torch.testing.assert_close(grad, reference[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("lengths", [[7, 1, 40, 3], [40], [1]])
def test_inference_forward_equals_padded_for_batches_and_single_texts(lengths):
    """Without gradients the projections run unfused, and one text runs attention with no padding at all."""
    model = _model("ernie").eval()
    ids, mask, types = _ragged(lengths, seed=2)
    with torch.inference_mode():
        padded = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        packed = pack_padded(ids, mask, types)
        hidden = encode_packed(
            model,
            **{
                k: packed[k]
                for k in ("input_ids", "token_type_ids", "position_ids", "seq_index", "cu_seqlens", "max_len")
            },
        )
    torch.testing.assert_close(hidden, padded[mask.bool()], atol=ATOL, rtol=0)


@pytest.mark.parametrize("lengths", [[3, 3, 3, 3, 3, 3, 150, 200, 256], [200, 1, 256, 3, 2, 150, 3, 3]])
def test_attention_in_spans_equals_each_sample_alone(lengths):
    """The CPU attention pads spans of neighbouring samples to their own longest: the cut is made, sorted or not
    (sorted, the short ones form a span of equal lengths: no copy, no mask), and every sample's output and
    gradients equal those of the sample attending alone (a one-token sample included)."""
    heads, dim = 2, 32
    layout_args = pack([{"input_ids": np.zeros(n, np.int64)} for n in lengths])
    layout = Layout(
        layout_args["cu_seqlens"], layout_args["max_len"], layout_args["seq_index"], layout_args["position_ids"]
    )
    spans = layout.spans(heads * dim)
    assert len(spans) > 1 and spans[0][0] == 0 and spans[-1][1] == sum(lengths)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    if lengths == sorted(lengths):
        assert [(part.n_samples, part.max_len, part.equal_lengths()) for *_, part in spans] == [
            (6, 3, True),
            (3, 256, False),
        ]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), heads, dim, generator=g, requires_grad=True) for _ in range(3))
    weights = torch.randn(sum(lengths), heads, dim, generator=g)
    (packed_attention(q, k, v, layout) * weights).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    out = packed_attention(q, k, v, layout).detach()
    for t in (q, k, v):
        t.grad = None
    cu = layout.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        alone = torch.nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v))
        ).transpose(0, 1)
        torch.testing.assert_close(out[a:b], alone.detach(), atol=ATOL, rtol=0)
        (alone * weights[a:b]).sum().backward()
    for mine, reference in zip(got, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(mine, reference, atol=ATOL, rtol=0)


def _with_dropout(model, p: float):
    model.config.attention_probs_dropout_prob = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
    return model


def test_cpu_dropout_keeps_1_minus_p_scaled_and_follows_the_seed():
    from domainlm.encoder.dropout import dropout

    x = torch.full((1000, 1001), 2.0, requires_grad=True)  # an odd count: the last 64-bit draw is cut
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    torch.manual_seed(0)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.002)  # 1M elements: 3 standard deviations
    assert torch.equal(y[kept], torch.full((int(kept.sum()),), 2.0 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.9)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.1, True), y)  # the default generator: seeds hold
    assert not dropout(x, 1.0, True).any()
    assert dropout(x.detach().bfloat16(), 0.5, True).dtype == torch.bfloat16


def test_cpu_dropout_add_is_the_residual_plus_the_same_dropout():
    """One pass for a layer's output dropout and residual: the same masks as `dropout` from the same seed, the sum in
    the residual's dtype (fp32 under autocast, the bf16 product not rounded first), gradients to both."""
    from domainlm.encoder.dropout import dropout, dropout_add

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 64, generator=g, requires_grad=True)
    residual = torch.randn(300, 64, generator=g, requires_grad=True)
    torch.manual_seed(5)
    fused = dropout_add(x, residual, 0.2, True)
    torch.manual_seed(5)
    plain = dropout(x, 0.2, True) + residual
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    fused.sum().backward()
    kept = (plain - residual).detach() != 0
    assert torch.equal(residual.grad, torch.ones_like(residual)) and torch.equal(x.grad, kept.float() / 0.8)
    low = x.detach().bfloat16()
    torch.manual_seed(5)
    mixed = dropout_add(low, residual.detach(), 0.2, True)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, residual.detach() + low.float() * (kept.float() / 0.8), atol=1e-6, rtol=0)
    assert torch.equal(dropout_add(x, residual, 0.2, False), x + residual)


def test_training_forward_runs_the_cpu_kernels_with_dropout():
    """A training forward with dropout on a CPU: the products kernel and its dropout, finite, and different from
    the same forward without dropout (eval) by about what dropout 0.1 does."""
    model = _with_dropout(_model("bert"), 0.1)
    ids, mask, types = _ragged([9, 2, 30])
    p = pack_padded(ids, mask, types)
    args = [p[k] for k in ("input_ids", "token_type_ids", "position_ids", "seq_index", "cu_seqlens", "max_len")]
    torch.manual_seed(0)
    train = encode_packed(model.train(), *args)
    evaluated = encode_packed(model.eval(), *args)
    assert torch.isfinite(train).all() and not torch.allclose(train, evaluated, atol=0.05)
    assert (train - evaluated).abs().mean() < evaluated.abs().mean()


@pytest.mark.parametrize("kind", ["bert", "ernie", "roberta"])
def test_training_embeddings_are_the_modules_with_the_cpu_dropout(kind):
    """In training the packed encoder computes the embeddings itself (for the cheaper dropout): each value the module
    gives without dropout, kept or zeroed as `encoder.dropout` decides, with the gradients of that."""
    from domainlm.encoder.dropout import dropout
    from domainlm.encoder.packed import embed

    model = _with_dropout(_model(kind), 0.25)
    ids, mask, types = _ragged([9, 1, 30])
    p = pack_padded(ids, mask, types)
    positions = p["position_ids"] + (2 if kind == "roberta" else 0)
    rows = (p["input_ids"], p["token_type_ids"], positions)
    emb = model.embeddings.eval()
    reference = emb(input_ids=rows[0][None], token_type_ids=rows[1][None], position_ids=rows[2][None])[0]
    torch.manual_seed(3)
    mine = embed(emb.train(), *rows)
    torch.manual_seed(3)
    expected = dropout(reference, 0.25, True)  # the same draws: the masks agree
    torch.testing.assert_close(mine, expected, atol=ATOL, rtol=0)
    assert 0.6 < (mine != 0).float().mean() < 0.9
    mine.sum().backward()
    table = emb.word_embeddings.weight.grad
    assert table[p["input_ids"].unique()].abs().sum(1).gt(0).all() and not table[0].any()
    assert torch.equal(embed(emb.eval(), *rows), reference)  # in inference: the module's own forward


def test_the_bf16_products_kernel_is_attention():
    """`_bmm_attention` (what bf16 runs on a CPU) computes what SDPA does, with a key mask or without."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 16, generator=g) for _ in range(3))
    mask = (torch.arange(9)[None, :] < torch.tensor([9, 4, 1])[:, None])[:, None, None, :]
    for m in (mask, None):
        torch.testing.assert_close(
            _bmm_attention(q, k, v, m, 0.0, 0.3),
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3),
            atol=ATOL,
            rtol=0,
        )
    assert not _bmm_attention(q, k, v, mask, 1.0, 0.3).any()  # dropout acts on the probabilities


@pytest.mark.parametrize("lengths", [[3, 3, 3, 3, 3, 3, 150, 200], [4, 4, 4]])
def test_bf16_attention_on_the_cpu_stays_in_bf16(lengths):
    """bf16 on a CPU: no conversion of q, k, v or the scores to fp32 (SDPA's math path makes them), and the output
    and gradients of fp32 attention within bf16's precision (8 bits of mantissa)."""
    heads, dim = 2, 32
    packed = pack([{"input_ids": np.zeros(n, np.int64)} for n in lengths])
    layout = Layout(packed["cu_seqlens"], packed["max_len"], packed["seq_index"], packed["position_ids"])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), heads, dim, generator=g, requires_grad=True) for _ in range(3))
    weights = torch.randn(sum(lengths), heads, dim, generator=g)
    reference = packed_attention(q, k, v, layout)
    (reference * weights).sum().backward()
    low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    assert bmm_usable(low[0]) and not bmm_usable(q)
    low_weights = weights.bfloat16()
    with torch.profiler.profile(record_shapes=True) as prof:
        out = packed_attention(*low, layout)
        (out * low_weights).sum().backward()
    ran = prof.key_averages(group_by_input_shape=True)
    # (the layout's few integers may convert: sample lengths)
    converted = [e.input_shapes[0] for e in ran if e.key == "aten::_to_copy" and np.prod(e.input_shapes[0]) >= dim]
    assert out.dtype == torch.bfloat16 and converted == [] and "scaled_dot_product" not in str([e.key for e in ran])
    torch.testing.assert_close(out.float(), reference.detach(), atol=0.03, rtol=0.02)
    for mine, fp32 in zip(low, (q, k, v)):
        torch.testing.assert_close(mine.grad.float(), fp32.grad, atol=0.05, rtol=0.02)


def test_pack_gives_ids_per_sample():
    rows = [
        {"input_ids": np.array([2, 5, 6, 3]), "token_type_ids": np.array([0, 0, 1, 1])},
        {"input_ids": np.array([2])},
        {"input_ids": np.array([2, 7, 3])},
    ]
    p = pack(rows)
    assert p["input_ids"].tolist() == [2, 5, 6, 3, 2, 2, 7, 3]
    assert p["position_ids"].tolist() == [0, 1, 2, 3, 0, 0, 1, 2]
    assert p["token_type_ids"].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert p["seq_index"].tolist() == [0, 0, 0, 0, 1, 2, 2, 2]
    assert p["cu_seqlens"].dtype == torch.int32 and p["cu_seqlens"].tolist() == [0, 4, 5, 8]
    assert p["max_len"] == 4
    with pytest.raises(ValueError, match="at least one token"):
        pack([{"input_ids": np.array([], dtype=np.int64)}])


def test_samples_do_not_see_each_other():
    """Changing one sample's tokens leaves every other sample's hidden states unchanged."""
    model = _model("bert").eval()
    ids, mask, types = _ragged([5, 9, 4])
    args = ("input_ids", "token_type_ids", "position_ids", "seq_index", "cu_seqlens", "max_len")
    a = pack_padded(ids, mask, types)
    ids2 = ids.clone()
    ids2[1, :9] = torch.randint(5, 97, (9,), generator=torch.Generator().manual_seed(3))
    b = pack_padded(ids2, mask, types)
    ha = encode_packed(model, **{k: a[k] for k in args})
    hb = encode_packed(model, **{k: b[k] for k in args})
    torch.testing.assert_close(ha[:5], hb[:5])
    torch.testing.assert_close(ha[14:], hb[14:])
    assert not torch.allclose(ha[5:14], hb[5:14])


def test_unsupported_blocks_are_detected():
    from transformers import MegatronBertConfig, MegatronBertModel

    model = MegatronBertModel(
        MegatronBertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        )
    )
    assert not supports_packing(model)  # pre-LayerNorm blocks: the padded HF forward runs instead


def test_flash_kernel_is_chosen_only_where_it_runs():
    """Without CUDA (or in fp32) the padded-SDPA kernel runs; shapes and dtypes decide, not the machine."""
    q = torch.randn(10, 4, 8)
    assert not flash_usable(q)
    assert not flash_usable(q.bfloat16())
    layout = Layout(
        torch.tensor([0, 4, 10], dtype=torch.int32),
        6,
        torch.tensor([0] * 4 + [1] * 6),
        torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5]),
    )
    assert layout.n_samples == 2


@pytest.mark.parametrize("drop", [0.0, 0.1])
def test_gradient_checkpointing_recomputes_the_packed_layers_with_the_same_gradients(monkeypatch, drop):
    """Recomputed layers give the same gradients, dropout included (its masks drawn again from the same RNG state)."""
    from domainlm.encoder import packed as packed_module

    model = _with_dropout(_model("bert"), drop).train()
    ids, mask, types = _ragged([6, 1, 11])
    p = pack_padded(ids, mask, types)
    args = [p[k] for k in ("input_ids", "token_type_ids", "position_ids", "seq_index", "cu_seqlens", "max_len")]
    grads, calls = [], []
    for on in (False, True):
        count, layer_forward = [0], packed_module._layer

        def counted(*args, _forward=layer_forward, _count=count):
            _count[0] += 1
            return _forward(*args)

        monkeypatch.setattr(packed_module, "_layer", counted)
        model.zero_grad()
        if on:
            from domainlm.classify.model import enable_checkpointing

            enable_checkpointing(model)
        torch.manual_seed(3)
        encode_packed(model, *args).pow(2).sum().backward()
        monkeypatch.setattr(packed_module, "_layer", layer_forward)
        calls.append(count[0])
        grads.append({n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    assert calls == [2, 4]  # 2 layers, each run again in the backward pass
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
