"""Attention over a packed token stream: each sample attends to its own tokens only.

Two kernels, chosen per call by what the inputs allow:
- CUDA with bf16/fp16 inputs: FlashAttention-2's variable-length kernel (PyTorch's own build of it, so no extra
  package), which takes the sample boundaries (`cu_seqlens`) and touches no padded position. Measured on one H200
  (bench/attention_bench.py, 128 packed samples of seq 256, 12 x 64 heads, forward + backward): 0.65 ms, the same
  as SDPA over the padded batch with a key mask (0.66 ms, 14% more positions); `flex_attention` with a document
  mask took 10.6 ms with its block mask built per micro batch, as packed batches need; SDPA over a padded copy of
  the stream 1.7 ms. Attention is not where unpadding wins: every other layer of the encoder is, and this kernel
  lets them stay unpadded. It is called through aten's flash ops in an autograd.Function of our own because
  PyTorch's public `varlen_attn` has no attention dropout, which BERT/ERNIE configs train with (0.1).
- Anything else (CPU, fp32): the stream is scattered into a [samples, longest, heads, dim] buffer and SDPA runs
  with a key mask, then the rows are gathered back. Only the attention sees padding; on short texts it is a
  small part of the FLOPs, and the result equals the padded model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Layout:
    """Where each sample sits in a stream of T tokens."""

    cu_seqlens: torch.Tensor  # [B + 1] int32: sample b is tokens cu[b]:cu[b+1]
    max_len: int  # longest sample (a host int: the kernels size their grids by it without a device sync)
    seq_index: torch.Tensor  # [T] int64: the sample of each token
    positions: torch.Tensor  # [T] int64: each token's position within its sample

    @property
    def n_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    def key_mask(self) -> torch.Tensor:
        """[B, 1, 1, longest] bool: True at each sample's real positions of a `scatter_padded` buffer."""
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        return (torch.arange(self.max_len, device=lengths.device)[None, :] < lengths[:, None])[:, None, None, :]


def flash_usable(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


class _FlashVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_len: int, dropout_p: float, scale: float):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, dropout_p, False, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng_state, unused)
        ctx.max_len, ctx.dropout_p, ctx.scale = max_len, dropout_p, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, ctx.dropout_p, False,
            rng_state, unused, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None


def scatter_padded(t: torch.Tensor, layout: Layout, width: int | None = None) -> torch.Tensor:
    """Stream rows [T, ...] -> right-padded [B, width (default: longest), ...], zeros at padded positions."""
    buf = t.new_zeros(layout.n_samples, width or layout.max_len, *t.shape[1:])
    buf[layout.seq_index, layout.positions] = t
    return buf


def _padded_sdpa(q, k, v, layout: Layout, dropout_p: float, scale: float) -> torch.Tensor:
    def padded(t: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [B, h, L, d]
        return scatter_padded(t, layout).transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=layout.key_mask(),
                                         dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)[layout.seq_index, layout.positions]


def packed_attention(q, k, v, layout: Layout, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """q, k, v: [T, heads, head_dim] -> [T, heads, head_dim]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if flash_usable(q):
        return _FlashVarlen.apply(q, k, v, layout.cu_seqlens, layout.max_len, dropout_p, scale)
    if layout.n_samples == 1:  # one text (a served request): nothing to pad or mask
        def heads_first(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), dropout_p=dropout_p, scale=scale)
        return out[0].transpose(0, 1)
    return _padded_sdpa(q, k, v, layout, dropout_p, scale)
