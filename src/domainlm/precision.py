"""The numeric precision of a run: one rule for training (pretrain, finetune, distill) and PyTorch inference
(evaluate, predict, serve).

`auto` is bf16 autocast where the hardware runs bf16 natively: a CUDA GPU that supports it, or a CPU with
AVX512_BF16 (AMD Zen 4 and later, Intel Cooper Lake) or AMX (Intel Sapphire Rapids and later), where oneDNN's bf16
matrix products run at about twice fp32 or more. Elsewhere bf16 on a CPU is emulated and slower than fp32, so
`auto` is fp32 there. An explicit fp32 / bf16 / fp16 is taken as it is.
"""

from __future__ import annotations

import functools
import sys

CHOICES = ("auto", "fp32", "bf16", "fp16")


@functools.cache
def cpu_bf16_feature() -> str | None:
    """The CPU feature that runs bf16 natively ("AMX" or "AVX512_BF16"), or None."""
    import torch

    probes = (("AMX", "_is_amx_tile_supported"), ("AVX512_BF16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return name
        except RuntimeError:  # a PyTorch build without the CPU capability probes
            return None
    return None


def resolve(choice: str, device: str, cpu_feature: str | None | bool = False) -> tuple[str, str]:
    """(precision, why): precision is fp32, bf16 or fp16 for `device` ("cpu" or "cuda"). `cpu_feature` stands in
    for this CPU's (tests); False: look it up."""
    choice = "fp32" if choice == "no" else choice
    if choice != "auto":
        return choice, "as asked"
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        return ("bf16", f"{name} has bf16") if torch.cuda.is_bf16_supported() else ("fp32", f"{name} has no bf16")
    feature = cpu_bf16_feature() if cpu_feature is False else cpu_feature
    if feature:
        return "bf16", f"this CPU has {feature}"
    return "fp32", "this CPU has no native bf16 (AVX512_BF16 or AMX)"


_SAID: set[tuple[str, str]] = set()


def announce(precision: str, why: str, main: bool = True) -> None:
    """Say once per process which precision runs and why, e.g. "precision bf16 (this CPU has AVX512_BF16)"."""
    if main and (precision, why) not in _SAID:
        _SAID.add((precision, why))
        print(f"precision {precision} ({why})", file=sys.stderr)


def accelerate_name(precision: str) -> str:
    """Accelerate's word for a precision: "no" for fp32."""
    return "no" if precision == "fp32" else precision
