"""Attention over a packed token stream: each sample attends to its own tokens only.

The kernels, chosen per call by what the inputs allow:
- CUDA with bf16/fp16 inputs: FlashAttention-2's variable-length kernel (PyTorch's own build of it, so no extra
  package), which takes the sample boundaries (`cu_seqlens`) and touches no padded position. Measured on one H200
  (bench/attention_bench.py, 128 packed samples of seq 256, 12 x 64 heads, forward + backward): 0.65 ms, the same
  as SDPA over the padded batch with a key mask (0.66 ms, 14% more positions); `flex_attention` with a document
  mask took 10.6 ms with its block mask built per micro batch, as packed batches need; SDPA over a padded copy of
  the stream 1.7 ms. Attention is not where unpadding wins: every other layer of the encoder is, and this kernel
  lets them stay unpadded. It is called through aten's flash ops in an autograd.Function of our own because
  PyTorch's public `varlen_attn` has no attention dropout, which BERT/ERNIE configs train with (0.1).
- Anything else (CPU, fp32): the samples are cut into spans of neighbours (`Layout.spans`); each span is gathered
  into a [samples, longest, heads, dim] grid, attention runs with a key mask, and the real rows are gathered back.
  That attention is SDPA in fp32 inference. In bf16 (autocast on a CPU with native bf16), and in training (dropout),
  it is two batched matrix products around a softmax in the inputs' own dtype (`_bmm_attention`), with the cheaper
  dropout masks of `encoder.dropout`. SDPA's CPU kernels are slower there: with dropout it takes its math path,
  which converts q, k and v to fp32 in bf16 and draws the dropout mask with a serial kernel; without, its flash
  kernel's bf16 backward is slow. Measured on one core of a Zen 4, fwd + bwd, 12 samples of 101 tokens, 12 heads
  of 32: bf16 with dropout 34 ms (SDPA) and 16 ms (products), fp32 with dropout 36 and 25, bf16 without 48 and
  14; fp32 without dropout (SDPA's flash kernel) 17 and 23, so SDPA stays there.
  One grid for the whole batch spent about half of the attention's time on padding for short reviews (as the
  padded model does); a stream sorted by length (pretraining sorts each micro batch) cuts into spans of like
  lengths. A span of equal lengths (one text, too) is a view of the stream: no copy, no mask. The result equals
  the padded model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from domainlm.encoder.dropout import dropout
from domainlm.spans import cheapest_spans


@dataclass
class Layout:
    """Where each sample sits in a stream of T tokens."""

    cu_seqlens: torch.Tensor  # [B + 1] int32: sample b is tokens cu[b]:cu[b+1]
    max_len: int  # longest sample (a host int: the kernels size their grids by it without a device sync)
    seq_index: torch.Tensor  # [T] int64: the sample of each token
    positions: torch.Tensor  # [T] int64: each token's position within its sample
    _cache: dict = field(default_factory=dict, repr=False, compare=False)  # what the layers of one batch share

    @property
    def n_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    def key_mask(self) -> torch.Tensor:
        """[B, 1, 1, longest] bool: True at each sample's real positions of a `scatter_padded` buffer."""
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        return (torch.arange(self.max_len, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]

    def equal_lengths(self) -> bool:
        return self.n_samples * self.max_len == self.seq_index.numel()

    def part(self, a: int, b: int) -> tuple[int, int, Layout]:
        """Samples a..b-1 as a layout of their own, with their token range [t0, t1) in this stream."""
        cu = self.cu_seqlens[a : b + 1]
        t0, t1 = int(cu[0]), int(cu[-1])
        longest = int((cu[1:] - cu[:-1]).max())
        return t0, t1, Layout(cu - cu[0], longest, self.seq_index[t0:t1] - a, self.positions[t0:t1])

    def spans(self, width: int) -> list[tuple[int, int, Layout]]:
        """The batch cut into spans of neighbouring samples (`part`s), each to be padded to its own longest, where
        the padded attention costs least: rows x longest x (longest + 64) for the scores and the copies in and
        out, plus 2^22 / width a call, which also stands for a small call's lower efficiency (on 2 CPU cores,
        2 x 64 heads, short reviews: 31 ms against 47 ms in one span, fwd + bwd of 2 layers; a quarter of that
        call cost cut too finely, four times it about as well). Host lengths are needed, so a CUDA stream stays
        whole (a GPU pads cheaply; a sync would not be)."""
        key = ("spans", width)
        if key not in self._cache:
            if self.cu_seqlens.is_cuda or self.n_samples == 1:
                self._cache[key] = [(0, self.seq_index.numel(), self)]
            else:
                lengths = np.diff(self.cu_seqlens.numpy()).astype(np.int64)
                call = 2**22 // width
                cuts = cheapest_spans(lengths, lambda rows, longest: rows * longest * (longest + 64.0) + call)
                self._cache[key] = [self.part(a, b) for a, b in cuts]
        return self._cache[key]

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream as a [samples x longest] grid, by gathering: each slot's stream row (a padded slot repeats its
        sample's last row; the key mask hides it, so it gets no gradient) and each row's slot."""
        if "slots" not in self._cache:
            cu = self.cu_seqlens.long()
            last = cu[1:] - 1
            grid = torch.minimum(cu[:-1, None] + torch.arange(self.max_len, device=cu.device), last[:, None])
            self._cache["slots"] = grid.reshape(-1), self.seq_index * self.max_len + self.positions
        return self._cache["slots"]


def flash_usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


class _FlashVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_len: int, dropout_p: float, scale: float):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, dropout_p, False, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu, rng_state, unused)
        ctx.max_len, ctx.dropout_p, ctx.scale = max_len, dropout_p, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            cu,
            cu,
            ctx.max_len,
            ctx.max_len,
            ctx.dropout_p,
            False,
            rng_state,
            unused,
            scale=ctx.scale,
        )
        return dq, dk, dv, None, None, None, None


def scatter_padded(t: torch.Tensor, layout: Layout, width: int | None = None) -> torch.Tensor:
    """Stream rows [T, ...] -> right-padded [B, width (default: longest), ...], zeros at padded positions."""
    buf = t.new_zeros(layout.n_samples, width or layout.max_len, *t.shape[1:])
    buf[layout.seq_index, layout.positions] = t
    return buf


def bmm_usable(q: torch.Tensor, dropout_p: float = 0.0) -> bool:
    """Whether `_bmm_attention` runs rather than SDPA: on a CPU, in bf16 / fp16, or with dropout (training)."""
    return not q.is_cuda and (q.dtype in (torch.bfloat16, torch.float16) or dropout_p > 0)


def _bmm_attention(q, k, v, mask: torch.Tensor | None, dropout_p: float, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for [B, h, L, d] inputs in their own dtype: the scores, the softmax (which
    accumulates in fp32 internally) and the dropout in bf16, no conversion either way. `mask`: [B, 1, 1, L] bool,
    True where a key is real (every row has one).

    The scores come from one `baddbmm`: the scale applied in the product and the mask added as a bias of 0 / -inf
    per key, where scaling q, a product and a masked copy of the scores took three passes (a layer's attention with
    its backward 17.8 -> 15.5 ms for 32 x 128 tokens in bf16, the same scores)."""
    b, h, n, d = q.shape
    bias = torch.zeros(b, 1, 1, n, dtype=q.dtype, device=q.device)
    if mask is not None:
        bias.masked_fill_(~mask, float("-inf"))
    keys = k.reshape(b * h, n, d).transpose(1, 2)
    scores = torch.baddbmm(bias.expand(b, h, 1, n).reshape(b * h, 1, n), q.reshape(b * h, n, d), keys, alpha=scale)
    probs = torch.softmax(scores.view(b, h, n, n), dim=-1)
    return torch.matmul(dropout(probs, dropout_p, True), v)


def _attention(q, k, v, mask: torch.Tensor | None, dropout_p: float, scale: float) -> torch.Tensor:
    if bmm_usable(q, dropout_p):
        return _bmm_attention(q, k, v, mask, dropout_p, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _padded_sdpa(q, k, v, layout: Layout, dropout_p: float, scale: float) -> torch.Tensor:
    if layout.equal_lengths():  # [T, h, d] is [B, L, h, d] already: no copy, no mask

        def padded(t: torch.Tensor) -> torch.Tensor:
            return t.view(layout.n_samples, layout.max_len, *t.shape[1:]).transpose(1, 2)

        out = _attention(padded(q), padded(k), padded(v), None, dropout_p, scale)
        return out.transpose(1, 2).reshape(q.shape)

    # gathered, not scattered into zeros: one copy per tensor each way, and no index_put in the backward pass
    grid, slots = layout.slots()

    def padded(t: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [B, h, L, d]
        return t.index_select(0, grid).view(layout.n_samples, layout.max_len, *t.shape[1:]).transpose(1, 2)

    out = _attention(padded(q), padded(k), padded(v), layout.key_mask(), dropout_p, scale)
    return out.transpose(1, 2).reshape(-1, *q.shape[1:]).index_select(0, slots)


def packed_attention(q, k, v, layout: Layout, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """q, k, v: [T, heads, head_dim] -> [T, heads, head_dim]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if flash_usable(q):
        return _FlashVarlen.apply(q, k, v, layout.cu_seqlens, layout.max_len, dropout_p, scale)
    spans = layout.spans(q.shape[1] * q.shape[2])
    if len(spans) == 1:
        return _padded_sdpa(q, k, v, layout, dropout_p, scale)
    return torch.cat([_padded_sdpa(q[t0:t1], k[t0:t1], v[t0:t1], part, dropout_p, scale) for t0, t1, part in spans])
