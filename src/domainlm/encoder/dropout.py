"""Dropout for the packed encoder: PyTorch's own on a GPU, one with a quarter of the random draws on a CPU.

On a CPU, `F.dropout` draws one Bernoulli variate per element with a serial kernel (one core, about 6 ns an element
on a Zen 4 whatever the thread count): 19% of a bf16 pretraining step of the ERNIE micro shape and 22% of a bf16
fine-tuning step of a 4x256 BERT, once the matrix products ran in bf16 (bench/cpu_profile.py). Here each 64-bit
draw gives four 16-bit uniform integers, each kept when it is at least p x 2^16: the same keep probability (to
within 2^-17), the same scaling by 1 / (1 - p), about 2.4x faster forward and backward. The masks come from the
default generator, so seeds, and gradient checkpointing's replay of the RNG state, work as with `F.dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with the masks drawn as above on a CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return x * _scaled_mask(x, p)


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`residual + dropout(x, p, training)`; on a CPU one pass (`addcmul`) for the product with the mask and the sum,
    in the sum's dtype (the residual stream's fp32 under autocast: the product is not rounded to bf16 first)."""
    if not training or p == 0.0 or x.device.type != "cpu" or p >= 1.0:
        return dropout(x, p, training) + residual
    return torch.addcmul(residual, x, _scaled_mask(x, p))


def _scaled_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A keep mask in x's dtype and shape, 1 / (1 - p) where kept and 0 elsewhere, from the default generator."""
    n = x.numel()
    # all 64 bits (`to=None`): no modulo per draw, which a range of 2^64 - 1 costs (17% of the draws' time)
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    keep = draws.view(torch.int16)[:n].view(x.shape) >= round(p * 65536) - 32768  # uniform over [-2^15, 2^15)
    return keep.to(x.dtype).mul_(1.0 / (1.0 - p))
