"""The encoder's layers for inference on a CPU, with their weights packed once for oneDNN.

A model loaded to predict, evaluate or serve never changes its weights, so what every call of a `nn.Linear` redoes
can be done once at load time: the weight cast to the precision it runs at (autocast casts it again in each batch),
reordered into the blocked layout oneDNN's matrix kernels read (`mkldnn::_reorder_linear_weight`), and the query,
key and value weights joined into one product. Each layer then runs its four products as oneDNN primitives with
their pointwise work fused in (`mkldnn::_linear_pointwise`, the op PyTorch's own compiler emits for CPU inference):
the activation inside the feed-forward product, the residual added by the output products. The stream of hidden
states stays in the packed dtype from layer to layer (in bf16: no fp32 residual stream cast again into each
product, as under autocast).

Measured on 2 cores of an AMD EPYC with AVX512_BF16 (a 4 x 256 classifier, 1,000 reviews, in one process): bf16
predict 1.50 s -> 1.29 s, fp32 2.80 s -> 2.25 s; with the weights not packed the same fused kernels gained nothing
(oneDNN reorders them on each call). docs/cpu.md has the figures; tests/test_frozen.py compares the numbers with the
modules' (equal in fp32, within autocast's own rounding in bf16).

`freeze` returns None wherever this does not apply (a GPU, a PyTorch without these ops, an activation oneDNN does
not fuse here, weights that are not on the CPU, packed products whose answers to a few check rows differ from
the modules'): the callers then run the modules as they are.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from domainlm.encoder.attention import Layout, packed_attention
from domainlm.encoder.packed import joined_qkv

# transformers' `hidden_act` names -> oneDNN's (attr, algorithm) of `_linear_pointwise`
ACTIVATIONS = {
    "gelu": ("gelu", "none"),  # erf GELU, BERT's and ERNIE's
    "gelu_new": ("gelu", "tanh"),
    "gelu_pytorch_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
}
DTYPES = (torch.bfloat16, torch.float32)


class Product(NamedTuple):
    """One linear layer, packed: y = x W^T + b."""

    weight: torch.Tensor  # oneDNN's blocked layout of W in the run dtype
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor, attr: str = "none", algorithm: str = "") -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, attr, [], algorithm)

    def plus(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x W^T + b + residual, the add fused into the product."""
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")


class FrozenLayer(NamedTuple):
    qkv: Product
    attention_out: Product
    norm1: nn.LayerNorm
    intermediate: Product
    out: Product
    norm2: nn.LayerNorm


def available() -> bool:
    """Whether this PyTorch has the oneDNN ops (a CPU build with mkldnn)."""
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(torch.ops.mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight")
        )
    except (AttributeError, RuntimeError):
        return False


def runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs its products at `dtype` on this CPU: fp32 on any; bf16 where the CPU has the instructions
    its bf16 kernels need (AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX; elsewhere it refuses them)."""
    if not available() or dtype not in DTYPES:
        return False
    if dtype == torch.float32:
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _product(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Product:
    w = weight.detach().to(dtype).contiguous()
    return Product(torch.ops.mkldnn._reorder_linear_weight(w, None), None if bias is None else bias.detach().to(dtype))


def _norm(norm: nn.LayerNorm, dtype: torch.dtype) -> nn.LayerNorm:
    copy = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, dtype=dtype)
    with torch.no_grad():
        copy.weight.copy_(norm.weight)
        copy.bias.copy_(norm.bias)
    return copy.requires_grad_(False)


def _freeze_layer(layer: nn.Module, dtype: torch.dtype) -> FrozenLayer:
    block, ffn = layer.attention.output, layer.output
    return FrozenLayer(
        _product(*joined_qkv(layer.attention.self), dtype),
        _product(block.dense.weight, block.dense.bias, dtype),
        _norm(block.LayerNorm, dtype),
        _product(layer.intermediate.dense.weight, layer.intermediate.dense.bias, dtype),
        _product(ffn.dense.weight, ffn.dense.bias, dtype),
        _norm(ffn.LayerNorm, dtype),
    )


class FrozenEncoder:
    """The layers of a BERT-family encoder (one that `encoder.packed` runs), packed for inference at `dtype`."""

    def __init__(self, base_model: nn.Module, dtype: torch.dtype, activation: tuple[str, str]):
        self.dtype = dtype
        self.activation = activation
        self.heads = base_model.config.num_attention_heads
        self.layers = [_freeze_layer(layer, dtype) for layer in base_model.encoder.layer]

    def layer(self, i: int, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Layer i of a packed stream x [T, width] (in `dtype`): what the module's own forward computes in eval."""
        t, width = x.shape
        p = self.layers[i]
        q, k, v = p.qkv(x).view(t, 3, self.heads, width // self.heads).unbind(1)
        context = packed_attention(q, k, v, layout).reshape(t, width)
        x = p.norm1(p.attention_out.plus(context, x))
        return p.norm2(p.out.plus(p.intermediate(x, *self.activation), x))

    def __call__(self, x: torch.Tensor, layout: Layout, depth: int | None = None) -> torch.Tensor:
        """The first `depth` layers (default: all), autocast off: every op runs in `dtype` as packed."""
        with torch.autocast("cpu", enabled=False):
            x = x.to(self.dtype)
            for i in range(len(self.layers) if depth is None else depth):
                x = self.layer(i, x, layout)
        return x


def freeze(base_model: nn.Module, dtype: torch.dtype) -> FrozenEncoder | None:
    """`base_model`'s layers packed for CPU inference at `dtype` (bf16 or fp32), or None where that does not apply
    (see the module's text): the caller then runs the modules."""
    config = getattr(base_model, "config", None)
    activation = ACTIVATIONS.get(getattr(config, "hidden_act", None))
    if activation is None or not runs(dtype):
        return None
    if any(p.device.type != "cpu" for p in base_model.parameters()):
        return None
    try:
        packed = FrozenEncoder(base_model, dtype, activation)
        agrees = _agrees(packed, base_model)
    except (RuntimeError, AttributeError, NotImplementedError):  # a layer oneDNN or this code does not take
        return None
    return packed if agrees else None


def _agrees(packed: FrozenEncoder, base_model: nn.Module) -> bool:
    """Whether the first layer's packed products give the modules' answers (within `dtype`'s rounding, relative to
    their scale) on a few random rows: the joined query/key/value product, the feed-forward product with its
    activation, the output product with its residual. A check at load time that this PyTorch's oneDNN ops compute
    what this code expects of them."""
    layer, p = base_model.encoder.layer[0], packed.layers[0]
    sa, ffn = layer.attention.self, layer.intermediate
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, base_model.config.hidden_size, generator=generator)
    wide = torch.randn(5, ffn.dense.out_features, generator=generator)
    with torch.inference_mode():
        x = x * (2.0 / ffn.dense(x).std().clamp_min(1e-6))  # pre-activations of about +-2: where activations differ
        pairs = [
            (p.qkv(x.to(packed.dtype)), torch.cat([m(x) for m in (sa.query, sa.key, sa.value)], -1)),
            (p.intermediate(x.to(packed.dtype), *packed.activation), ffn.intermediate_act_fn(ffn.dense(x))),
            (p.out.plus(wide.to(packed.dtype), x.to(packed.dtype)), layer.output.dense(wide) + x),
        ]
    tolerance = 1e-5 if packed.dtype == torch.float32 else 0.03
    for got, want in pairs:
        error = (got.float() - want).abs().max() / want.abs().max().clamp_min(1e-6)
        if not torch.isfinite(got).all() or error.item() > tolerance:
            return False
    return True
