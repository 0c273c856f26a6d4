"""Attention kernels for packed BERT batches on one GPU: forward + backward time per micro batch.

The sample lengths of a real micro batch (domainlm's packed SOP samples of People's Daily, seq 256 x 128 by default)
and the ERNIE 3.0 base head shape (12 x 64), bf16. Kernels: variable-length flash attention over the packed stream
(what `encoder.attention` runs on a GPU), with and without attention dropout; SDPA over the padded batch with a key
mask (what the padded HF model runs); SDPA over the padded batch without a mask (a bound no padded kernel beats);
`flex_attention` over the stream with a document mask, the block mask built per micro batch and counted.

    python bench/attention_bench.py --samples bench/out/gpu-data/news256.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))


def timed_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    from pretrain_bench import load_samples

    from domainlm.encoder.attention import Layout, _FlashVarlen, _padded_sdpa
    from domainlm.encoder.packed import pack

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    from domainlm.precision import describe_cpu

    print(describe_cpu())
    items = load_samples(args.samples)[: args.batch]
    p = pack(items)
    heads, d = 12, 64
    t, b, length = p["input_ids"].numel(), len(items), p["max_len"]
    dev = "cuda"
    cu = p["cu_seqlens"].to(dev)
    layout = Layout(cu, length, p["seq_index"].to(dev), p["position_ids"].to(dev))
    q, k, v = (torch.randn(t, heads, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(t, heads, d, device=dev, dtype=torch.bfloat16)
    lengths = cu[1:] - cu[:-1]
    keys = torch.arange(length, device=dev)[None] < lengths[:, None]
    qp, kp, vp = (
        torch.randn(b, heads, length, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    gp = torch.randn(b, heads, length, d, device=dev, dtype=torch.bfloat16)

    def run(out, g):
        out.backward(g)

    kernels = {
        "flash varlen (packed)": lambda: run(_FlashVarlen.apply(q, k, v, cu, length, 0.0, d**-0.5), grad),
        "flash varlen, dropout 0.1": lambda: run(_FlashVarlen.apply(q, k, v, cu, length, 0.1, d**-0.5), grad),
        "SDPA padded, key mask (HF)": lambda: run(
            F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keys[:, None, None]), gp
        ),
        "SDPA padded, no mask (bound)": lambda: run(F.scaled_dot_product_attention(qp, kp, vp), gp),
        "padded SDPA around the stream": lambda: run(_padded_sdpa(q, k, v, layout, 0.0, d**-0.5), grad),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = layout.seq_index
        flex = torch.compile(flex_attention)

        def flex_step():
            mask = create_block_mask(lambda b_, h_, qi, ki: doc[qi] == doc[ki], None, None, t, t, device=dev)
            out = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask)
            out.backward(grad.transpose(0, 1)[None])

        kernels["flex_attention, document mask"] = flex_step
    except Exception as e:  # noqa: BLE001  (an older PyTorch: report and go on)
        print(f"flex_attention unavailable: {e}")
    real = int(lengths.sum())
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {b} samples, {real} real tokens, padded "
        f"{b * length} ({100 * (1 - real / (b * length)):.0f}% padding); 12 heads x 64, bf16, forward + backward"
    )
    times = {}
    for name, fn in kernels.items():
        try:
            times[name] = timed_ms(fn)
        except Exception as e:  # noqa: BLE001
            print(f"  {name:32} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        print(f"  {name:32} {times[name]:7.3f} ms")
    base = times.get("SDPA padded, key mask (HF)")
    if base:
        for name, ms in times.items():
            print(f"  ratio {name:26} {base / ms:5.2f}x vs SDPA padded with mask")


if __name__ == "__main__":
    main()
