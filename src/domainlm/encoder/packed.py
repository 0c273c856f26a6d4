"""BERT-family encoders (BERT, ERNIE, RoBERTa, ...) run on a packed token stream.

A micro batch of B samples with n_1..n_B tokens becomes one stream of T = n_1 + ... + n_B tokens: every linear
layer, LayerNorm, activation and dropout runs on [T, hidden] rows, so no FLOP is spent on a padded position, and
attention sees each sample's boundaries (`attention.packed_attention`). The forward reads the HF modules' own
weights and submodules (embeddings, each layer's attention output, intermediate and output blocks), so the model
stays a plain HF model: snapshots, exports and the padded HF forward are untouched, and the two forwards give
the same numbers (tests compare them in fp32).

The query, key and value projections run as one matrix product of three times the width: one kernel instead of
three, and a larger one. Each layer's output blocks (dense, dropout, residual, LayerNorm) are computed here from
the modules' weights, as their forward does, with the dropout of `encoder.dropout` (cheaper masks on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from domainlm.encoder.attention import Layout, packed_attention, scatter_padded
from domainlm.encoder.dropout import dropout, dropout_add

ROW_KEYS = ("input_ids", "token_type_ids", "position_ids", "seq_index")


def supports_packing(base_model: nn.Module) -> bool:
    """Whether `encode_packed` reproduces this model's own forward: absolute positions, post-LayerNorm BERT blocks."""
    config = getattr(base_model, "config", None)
    if config is None or getattr(config, "is_decoder", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    emb = getattr(base_model, "embeddings", None)
    layers = getattr(getattr(base_model, "encoder", None), "layer", None)
    if emb is None or layers is None or not len(layers):
        return False
    layer = layers[0]
    try:
        sa = layer.attention.self
        parts = (
            sa.query,
            sa.key,
            sa.value,
            layer.attention.output.dense,
            layer.attention.output.LayerNorm,
            layer.intermediate.dense,
            layer.output.dense,
            layer.output.LayerNorm,
        )
    except AttributeError:  # pre-LayerNorm (MegatronBert) and other block shapes
        return False
    drops = [getattr(block, "dropout", None) for block in (layer.attention.output, layer.output)]
    return all(isinstance(p, (nn.Linear, nn.LayerNorm)) for p in parts) and all(
        d is None or isinstance(d, nn.Dropout) for d in drops
    )


def position_offset(base_model: nn.Module) -> int:
    """RoBERTa numbers positions from padding_idx + 1; BERT and ERNIE from 0."""
    pad = getattr(base_model.embeddings, "padding_idx", None)
    return 0 if pad is None else pad + 1


def joined_qkv(sa: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The query, key and value projections of a self-attention module as one weight and bias (None where the
    projections have none)."""
    parts = (sa.query, sa.key, sa.value)
    weight = torch.cat([m.weight for m in parts])
    bias = None if any(m.bias is None for m in parts) else torch.cat([m.bias for m in parts])
    return weight, bias


def embed(emb: nn.Module, input_ids, token_type_ids, positions) -> torch.Tensor:
    """The embeddings module's output [T, hidden] for a stream of T tokens. In training, on a BERT-shaped module
    (word, token type and position tables, LayerNorm, dropout; ERNIE's task type table), computed here as its forward
    computes it, in its order, with the dropout of `encoder.dropout`: the module's own dropout draws one Bernoulli
    variate per element, 3% of a bf16 fine-tuning step on a CPU. Otherwise the module's forward."""
    drop = getattr(emb, "dropout", None)
    parts = ("word_embeddings", "token_type_embeddings", "position_embeddings", "LayerNorm")
    if not (emb.training and isinstance(drop, nn.Dropout) and drop.p > 0 and all(hasattr(emb, n) for n in parts)):
        # the module takes [batch, length] ids: the stream is one row of T tokens
        return emb(input_ids=input_ids[None], token_type_ids=token_type_ids[None], position_ids=positions[None])[0]
    x = emb.word_embeddings(input_ids) + emb.token_type_embeddings(token_type_ids)
    x = x + emb.position_embeddings(positions)
    if getattr(emb, "use_task_id", False):  # ERNIE's task type: 0 unless given, as its forward takes it
        x += emb.task_type_embeddings(torch.zeros_like(input_ids))
    return dropout(emb.LayerNorm(x), drop.p, True)


def _layer(layer: nn.Module, x: torch.Tensor, layout: Layout, heads: int, attention_dropout: float) -> torch.Tensor:
    t, width = x.shape
    sa = layer.attention.self
    if torch.is_grad_enabled():  # one product of three times the width; its weight is joined anew as it trains
        q, k, v = F.linear(x, *joined_qkv(sa)).view(t, 3, heads, width // heads).unbind(1)
    else:  # inference: joining the weights would copy them on every call, which costs a short text more than it saves
        q, k, v = (F.linear(x, m.weight, m.bias).view(t, heads, width // heads) for m in (sa.query, sa.key, sa.value))
    context = packed_attention(q, k, v, layout, attention_dropout if layer.training else 0.0)
    x = _output(layer.attention.output, context.reshape(t, width), x)
    return _output(layer.output, layer.intermediate(x), x)


def _output(block: nn.Module, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """A BERT block's output (BertSelfOutput, BertOutput): dense, dropout, residual, LayerNorm, as its own forward
    computes it, with the dropout of `encoder.dropout` (fewer random draws on a CPU)."""
    drop = getattr(block, "dropout", None)
    return block.LayerNorm(
        dropout_add(block.dense(hidden), residual, drop.p if drop is not None else 0.0, block.training)
    )


def encode_packed(
    base_model: nn.Module,
    input_ids,
    token_type_ids,
    position_ids,
    seq_index,
    cu_seqlens,
    max_len: int,
    depth: int | None = None,
    frozen: Callable[[torch.Tensor, Layout, int | None], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Hidden states [T, hidden] of a packed stream (each argument as `pack` makes it), after the first `depth`
    layers (default: all); in inference, by `frozen(x, layout, depth)` where given (the layers packed by
    `encoder.frozen.freeze`), in its dtype."""
    config = base_model.config
    layout = Layout(cu_seqlens, max_len, seq_index, position_ids)
    offset = position_offset(base_model)
    positions = position_ids + offset if offset else position_ids
    x = embed(base_model.embeddings, input_ids, token_type_ids, positions)
    if frozen is not None:
        return frozen(x, layout, depth)
    heads = config.num_attention_heads
    attention_dropout = getattr(config, "attention_probs_dropout_prob", 0.0)
    # gradient checkpointing as the model was told (`gradient_checkpointing_enable`): each layer recomputed in the
    # backward pass; non-reentrant, which replays dropout exactly
    layers = base_model.encoder.layer
    # transformers 4 keeps the switch on the encoder, 5 on each layer
    recompute = (
        getattr(base_model.encoder, "gradient_checkpointing", False)
        or getattr(layers[0], "gradient_checkpointing", False)
    ) and torch.is_grad_enabled()
    for layer in layers[:depth]:
        if recompute:
            x = torch.utils.checkpoint.checkpoint(
                _layer, layer, x, layout, heads, attention_dropout, use_reentrant=False
            )
        else:
            x = _layer(layer, x, layout, heads, attention_dropout)
    return x


def encode_batch(
    base_model: nn.Module,
    batch: dict,
    depth: int | None = None,
    frozen: Callable[[torch.Tensor, Layout, int | None], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`encode_packed` of a batch as `pack` (or a collate built on it) makes it."""
    rows = (batch[k] for k in ROW_KEYS)
    return encode_packed(base_model, *rows, batch["cu_seqlens"], batch["max_len"], depth=depth, frozen=frozen)


def first_tokens(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Each sample's first ([CLS]) row: [B, hidden]."""
    return hidden.index_select(0, cu_seqlens[:-1].long())


def pack(rows: list[dict[str, np.ndarray]]) -> dict:
    """Samples (dicts of 1-D arrays; `input_ids` and optional `token_type_ids`) -> one packed stream.

    Returns tensors for ROW_KEYS plus `cu_seqlens` ([B+1] int32) and `max_len` (an int)."""
    lengths = np.array([len(r["input_ids"]) for r in rows], dtype=np.int64)
    if not len(lengths) or lengths.min() < 1:
        raise ValueError("every packed sample needs at least one token")
    cu = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    ids = np.concatenate([np.asarray(r["input_ids"], dtype=np.int64) for r in rows])
    types = np.concatenate(
        [
            np.asarray(r["token_type_ids"], dtype=np.int64) if "token_type_ids" in r else np.zeros(n, np.int64)
            for r, n in zip(rows, lengths)
        ]
    )
    seq_index = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    positions = np.arange(len(ids), dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lengths)
    return {
        "input_ids": torch.from_numpy(ids),
        "token_type_ids": torch.from_numpy(types),
        "position_ids": torch.from_numpy(positions),
        "seq_index": torch.from_numpy(seq_index),
        "cu_seqlens": torch.from_numpy(cu),
        "max_len": int(lengths.max()),
    }


def pack_padded(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
) -> dict:
    """A right-padded [B, L] batch -> the packed stream of its real tokens (for tests and padded callers)."""
    mask = attention_mask.bool().cpu().numpy()
    ids = input_ids.cpu().numpy()
    types = None if token_type_ids is None else token_type_ids.cpu().numpy()
    rows = [
        {"input_ids": ids[i][mask[i]], **({} if types is None else {"token_type_ids": types[i][mask[i]]})}
        for i in range(len(ids))
    ]
    return pack(rows)


def unpack(hidden: torch.Tensor, packed: dict, width: int | None = None) -> torch.Tensor:
    """[T, H] -> right-padded [B, L, H] with zeros at padded positions (for comparisons)."""
    layout = Layout(packed["cu_seqlens"], packed["max_len"], packed["seq_index"], packed["position_ids"])
    return scatter_padded(hidden, layout, width)
