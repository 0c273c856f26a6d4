"""How a classifier runs: device, precision, threads and tokens per text, resolved once when it is loaded.

The flags (`--device auto --precision auto --threads 0 --max-seq-len 0`) say what the user asked for; a loaded
runtime holds the `RuntimeOptions` they came to (`cpu`, `int8`, `2` threads, `128` tokens), and everything after
the load (the server's batches, its start line, the metrics) reads them from there, never from the flags again.
The precision of a PyTorch classifier follows the one rule of training (domainlm.precision): `auto` is bf16 autocast
where the CPU (AVX512_BF16, AMX) or the GPU runs bf16 natively, fp32 elsewhere (`torch_precision`). An export
folder's precision is the model file it runs (fp32 or int8), not an autocast: this rule leaves ONNX Runtime alone.
Also here: which int8 kernels this CPU gives ONNX Runtime (VNNI or not), for the server's start line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from domainlm.precision import cpu_info


@dataclass(frozen=True)
class RuntimeOptions:
    """What a runtime was asked for (before `load`) or runs with (`runtime.options`, after it):
    device auto | cpu | cuda; precision auto | fp32 | int8 | bf16 | fp16; threads (0: the default); max_seq_len
    (0: the length saved with the model)."""

    device: str = "auto"
    precision: str = "auto"
    threads: int = 0
    max_seq_len: int = 0

    @classmethod
    def of(cls, cfg) -> RuntimeOptions:
        """The options of a command's config (any of its fields device, precision, threads, max_seq_len)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})

    def replace(self, **changes) -> RuntimeOptions:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """For a start line: 'cpu, fp32, 2 threads, 128 tokens per text'."""
        threads = f", {self.threads} thread{'s' if self.threads != 1 else ''}" if self.threads else ""
        length = f", {self.max_seq_len} tokens per text" if self.max_seq_len else ""
        return f"{self.device}, {self.precision}{threads}{length}"


def torch_precision(
    precision: str, device: str, cpu_feature: str | None | bool = False, gpu_bf16: bool | None = None
) -> tuple[str, str]:
    """(fp32 | bf16 | fp16, why) of a PyTorch classifier on `device` ("cpu" or "cuda"): `auto` by the rule of
    training (domainlm.precision.resolve: bf16 where the device runs it natively, else fp32); bf16 asked of a GPU
    without it runs fp16 autocast; fp16 on a CPU is an error. `cpu_feature` and `gpu_bf16` stand in for the
    hardware's (tests); False / None: look it up."""
    from domainlm.errors import DomainLMError
    from domainlm.precision import resolve

    precision = "fp32" if precision == "no" else precision
    if device != "cuda":
        if precision == "fp16":
            raise DomainLMError(
                "--precision fp16 runs on a GPU only (--device cuda); on the CPU use fp32, bf16 or auto"
            )
        return resolve(precision, "cpu", cpu_feature)
    if precision == "auto" and gpu_bf16 is None:
        return resolve("auto", "cuda")  # in the words training says it in (one line for distill's two models)
    if gpu_bf16 is None:
        import torch

        gpu_bf16 = torch.cuda.is_bf16_supported()
    if precision == "auto":
        return ("bf16", "the GPU has bf16") if gpu_bf16 else ("fp32", "the GPU has no bf16")
    if precision == "bf16" and not gpu_bf16:
        return "fp16", "bf16 asked; the GPU has no bf16"
    return precision, "as asked"


INT8_FEATURES = (("amx_int8", "AMX_INT8"), ("avx512_vnni", "AVX512_VNNI"), ("avx_vnni", "AVX_VNNI"))


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where there is no /proc/cpuinfo)."""
    return cpu_info(cpuinfo)[1]


def int8_kernels(flags: frozenset[str] | None = None) -> str:
    """Which integer dot-product instructions ONNX Runtime's int8 kernels use on this CPU: 'AVX512_VNNI' (or AMX_INT8,
    AVX_VNNI) where the CPU has them, else '' (the AVX2/AVX-512 kernels without VNNI, which is why exports quantize
    weights to 7 bits). Read from /proc/cpuinfo, else from PyTorch's own check."""
    flags = cpu_flags() if flags is None else flags
    if flags:
        return ", ".join(name for flag, name in INT8_FEATURES if flag in flags)
    try:
        import torch

        return "VNNI" if torch.cpu._is_vnni_supported() else ""
    except (ImportError, AttributeError):
        return ""


def int8_note(kind: str, device: str, flags: frozenset[str] | None = None) -> str:
    """What the server's start line says about an int8 model on the CPU ('' for any other)."""
    if not kind.endswith("int8") or device != "cpu":
        return ""
    found = int8_kernels(flags)
    if found:
        return f"int8 ONNX Runtime, this CPU has {found}"
    return "int8 ONNX Runtime, no VNNI on this CPU (AVX2 kernels, 7-bit weights)"
