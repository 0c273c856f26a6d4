"""On a GPU: the packed encoder's kernels give the padded model's numbers (run first by bench/gpu_suite.sh).

fp32 (the padded-SDPA kernel) and bf16 (variable-length flash attention) forward and gradients against the HF
padded forward in fp32; attention dropout through the flash kernel (a mean-preserving mask, gradients finite);
the packed forward under torch.compile with changing token counts. Prints one line per check and exits 1 on a miss.
"""

from __future__ import annotations

import sys

import torch


def model(dropout: float = 0.0):
    from transformers import ErnieConfig, ErnieModel

    torch.manual_seed(0)
    return ErnieModel(
        ErnieConfig(
            vocab_size=21128,
            hidden_size=768,
            num_hidden_layers=4,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
            type_vocab_size=4,
            use_task_id=True,
            task_type_vocab_size=3,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
    )


def ragged(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, 21128, (len(lengths), width), generator=g)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask, torch.zeros_like(ids)


def rel(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def main() -> int:
    from domainlm.encoder.packed import encode_packed, pack_padded
    from domainlm.precision import describe_cpu
    from domainlm.train.loop import to_device

    assert torch.cuda.is_available(), "no GPU"
    print(f"{torch.cuda.get_device_name()}; {describe_cpu()}")
    failures = 0

    def check(name: str, ok: bool, detail: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'MISS'} {name}: {detail}")

    lengths = [1, 37, 256, 5, 128, 200, 64, 3]
    ids, mask, types = ragged(lengths)
    m = model().cuda().eval()
    ref = m(input_ids=ids.cuda(), attention_mask=mask.cuda(), token_type_ids=types.cuda()).last_hidden_state[
        mask.cuda().bool()
    ]
    packed = to_device(pack_padded(ids, mask, types), "cuda")
    args = [packed[k] for k in ("input_ids", "token_type_ids", "position_ids", "seq_index", "cu_seqlens", "max_len")]
    fp32 = encode_packed(m, *args)
    check("fp32 packed vs padded forward", rel(fp32, ref) < 1e-5, f"relative error {rel(fp32, ref):.2e} (< 1e-5)")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = encode_packed(m, *args)
        ref16 = m(input_ids=ids.cuda(), attention_mask=mask.cuda(), token_type_ids=types.cuda()).last_hidden_state[
            mask.cuda().bool()
        ]
    check(
        "bf16 packed (flash) vs fp32",
        rel(bf16, ref) < 2e-2,
        f"relative error {rel(bf16, ref):.2e}; HF bf16 padded {rel(ref16, ref):.2e}",
    )

    # gradients: bf16 flash path vs fp32 padded reference
    m.train()
    w = torch.randn(ref.shape, device="cuda")
    (
        m(input_ids=ids.cuda(), attention_mask=mask.cuda(), token_type_ids=types.cuda()).last_hidden_state[
            mask.cuda().bool()
        ]
        * w
    ).sum().backward()
    reference = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = encode_packed(m, *args)
    (out.float() * w).sum().backward()
    # the key bias shifts every score of a query alike: its true gradient is 0, and both sides give rounding noise
    worst = max(
        rel(p.grad, reference[n])
        for n, p in m.named_parameters()
        if p.grad is not None and "pooler" not in n and "key.bias" not in n
    )
    check("bf16 packed gradients vs fp32 padded", worst < 5e-2, f"worst relative error over parameters {worst:.2e}")

    # attention dropout through the flash kernel
    d = model(dropout=0.1).cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = encode_packed(d, *args)
        b = encode_packed(d, *args)
    (a.float().sum()).backward()
    finite = all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)
    check(
        "dropout 0.1: fresh masks each call, finite gradients",
        bool(rel(a, b) > 1e-3) and finite,
        f"two calls differ by {rel(a, b):.2e}",
    )
    d.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        e1, e2 = encode_packed(d, *args), encode_packed(d, *args)
    check("eval mode is deterministic", rel(e1, e2) == 0.0, f"{rel(e1, e2):.1e}")

    # compiled, with token counts changing between calls
    compiled = torch.compile(lambda *x: encode_packed(m, *x))
    for k, lens in enumerate([lengths, [9, 250, 31], [256] * 4 + [2], [17, 18, 19, 20, 21, 22]]):
        i, mk, t = ragged(lens, seed=k)
        p = to_device(pack_padded(i, mk, t), "cuda")
        xs = [p[n] for n in ("input_ids", "token_type_ids", "position_ids", "seq_index", "cu_seqlens", "max_len")]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = compiled(*xs), encode_packed(m, *xs)
        check(
            f"compiled packed forward, {sum(lens)} tokens",
            rel(got, want) < 2e-2,
            f"relative error {rel(got, want):.2e}",
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
