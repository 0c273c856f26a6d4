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
from pathlib import Path

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


# the features that decide how fast a CPU runs an encoder, as Linux names them in /proc/cpuinfo, and as they are said
CPU_FEATURES = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512"),
    ("avx512_vnni", "AVX512_VNNI"),
    ("avx_vnni", "AVX_VNNI"),
    ("avx512_bf16", "AVX512_BF16"),
    ("amx_bf16", "AMX_BF16"),
    ("amx_int8", "AMX_INT8"),
)
# where there is no /proc/cpuinfo: PyTorch's own probes
TORCH_PROBES = (
    ("AVX2", "_is_avx2_supported"),
    ("AVX-512", "_is_avx512_supported"),
    ("VNNI", "_is_vnni_supported"),
    ("AVX512_BF16", "_is_avx512_bf16_supported"),
    ("AMX", "_is_amx_tile_supported"),
)


@functools.cache
def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(the CPU's model name, its feature flags) as Linux lists them; ("", empty) where there is no /proc/cpuinfo."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "", frozenset()
    name, flags = "", frozenset()
    for line in text.splitlines():
        if line.startswith("model name") and not name:
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = frozenset(line.split(":", 1)[1].split())
    return name, flags


def cpu_features(flags: frozenset[str] | None = None) -> list[str]:
    """The CPU's features among CPU_FEATURES (from `flags`, else /proc/cpuinfo, else PyTorch's probes)."""
    flags = cpu_info()[1] if flags is None else flags
    if flags:
        return [name for flag, name in CPU_FEATURES if flag in flags]
    import torch

    found = []
    for name, probe in TORCH_PROBES:
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                found.append(name)
        except RuntimeError:
            pass
    return found


def describe_cpu(flags: frozenset[str] | None = None, name: str | None = None, cores: int | None = None) -> str:
    """One line for a benchmark's header, e.g. 'CPU AMD EPYC, 2 cores: AVX2, AVX-512, AVX512_VNNI, AVX512_BF16 (native
    bf16: auto runs bf16)'. `flags`, `name`, `cores` stand in for this machine's (tests)."""
    import os

    name = cpu_info()[0] if name is None else name
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    features = cpu_features(flags)
    native = bool(cpu_bf16_feature()) if flags is None else bool({"AVX512_BF16", "AMX_BF16"} & set(features))
    listed = ", ".join(features) or "none of " + ", ".join(n for _, n in CPU_FEATURES)
    rule = "native bf16: auto runs bf16" if native else "no native bf16: auto runs fp32"
    return f"CPU {name or 'unknown'}, {cores} core{'s' if cores != 1 else ''}: {listed} ({rule})"


def accelerate_name(precision: str) -> str:
    """Accelerate's word for a precision: "no" for fp32."""
    return "no" if precision == "fp32" else precision
