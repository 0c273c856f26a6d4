"""Inference options resolved once, at load (`runtime.options`: device, precision, threads, tokens per text), and
the int8 kernels a CPU gives ONNX Runtime (VNNI or not), as the server's start line states them."""

import numpy as np
import pytest
import torch

from domainlm.classify.runtime import RuntimeOptions, TorchRuntime, available_cores
from domainlm.classify.runtime import load as load_runtime
from domainlm.classify.runtime_options import cpu_flags, int8_kernels, int8_note
from domainlm.precision import cpu_bf16_feature
from domainlm.serve.config import ServeConfig
from tests.test_classify import make_rows
from tests.test_export import TEXTS, exported, trained  # noqa: F401 - shared session fixtures


def test_options_are_resolved_at_load_and_kept_by_the_runtime(exported, trained, capsys):
    folder = str(exported[0])
    assert load_runtime(folder).options == RuntimeOptions("cpu", "int8", available_cores(), 32)  # auto: int8
    rt = load_runtime(folder, "fp32", "cpu", 1, 16)
    assert rt.options == RuntimeOptions("cpu", "fp32", 1, 16) and rt.max_seq_len == 16 and rt.kind == "onnx-fp32"
    assert load_runtime(folder, max_seq_len=4096).options.max_seq_len == 64  # capped at the positions, with a notice
    assert "--max-seq-len 4096 is more than" in capsys.readouterr().err
    torch_rt = TorchRuntime(str(trained["ft"]), precision="fp32")
    assert torch_rt.options == RuntimeOptions("cpu", "fp32", torch.get_num_threads(), 32)  # the length it trained at
    auto = TorchRuntime(str(trained["ft"])).options.precision  # the rule of training: bf16 where the CPU has it
    assert auto == ("bf16" if cpu_bf16_feature() else "fp32")
    assert (
        torch_rt.options.describe() == f"cpu, fp32, {torch.get_num_threads()} thread"
        f"{'s' if torch.get_num_threads() != 1 else ''}, 32 tokens per text"
    )
    assert RuntimeOptions.of(ServeConfig(model="m", device="cpu", threads=2, max_seq_len=8)) == RuntimeOptions(
        "cpu", "auto", 2, 8
    )


def test_int8_kernels_are_named_from_the_cpu_flags(tmp_path):
    vnni = frozenset({"avx2", "avx512f", "avx512_vnni"})
    assert int8_kernels(vnni) == "AVX512_VNNI"
    assert int8_kernels(frozenset({"avx2", "avx_vnni"})) == "AVX_VNNI"
    assert int8_kernels(frozenset({"amx_int8", "avx512_vnni"})) == "AMX_INT8, AVX512_VNNI"
    assert int8_kernels(frozenset({"avx2", "fma"})) == ""
    assert int8_note("onnx-int8", "cpu", vnni) == "int8 ONNX Runtime, this CPU has AVX512_VNNI"
    assert int8_note("onnx-int8", "cpu", frozenset({"avx2"})) == (
        "int8 ONNX Runtime, no VNNI on this CPU (AVX2 kernels, 7-bit weights)"
    )
    assert int8_note("onnx-fp32", "cpu", vnni) == "" and int8_note("onnx-int8", "cuda", vnni) == ""
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_vnni\n"
    )
    assert cpu_flags(str(info)) == frozenset({"fpu", "avx2", "avx512_vnni"})
    assert cpu_flags(str(tmp_path / "none")) == frozenset()


@pytest.mark.skipif(not cpu_bf16_feature(), reason="this CPU has no native bf16 (AVX512_BF16 or AMX): auto is fp32")
def test_bf16_on_this_cpu_answers_as_fp32_does(trained):
    """bf16 autocast keeps 8 bits of mantissa (a relative error of 0.4% per product): the probabilities of a
    classifier stay within 0.01 of fp32's (measured: 0.001), with the same labels wherever fp32's two best are 0.02
    apart (85% of these texts). A head made sharper scales the logits' error with it: 30x gives 0.023 and one flip."""
    texts = TEXTS + [r["text"] for r in make_rows(15, 2)]
    fp32, bf16 = TorchRuntime(str(trained["ft"]), precision="fp32"), TorchRuntime(str(trained["ft"]))  # auto
    assert bf16.options.precision == "bf16" and bf16.kind == "pytorch-bf16"
    want, got = fp32.predict(texts), bf16.predict(texts)
    assert np.abs(got - want).max() < 0.01 and not np.array_equal(got, want)  # close, and bf16 did run
    best = np.sort(want, axis=-1)
    clear = best[:, -1] - best[:, -2] > 0.02
    assert clear.mean() > 0.8 and (got.argmax(-1) == want.argmax(-1))[clear].all()


def test_cpu_features_are_named_in_one_line_for_benchmark_headers():
    from domainlm.precision import cpu_features, describe_cpu

    zen4 = frozenset({"fpu", "avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
    assert cpu_features(zen4) == ["AVX2", "AVX-512", "AVX512_VNNI", "AVX512_BF16"]
    assert describe_cpu(zen4, "AMD EPYC 9654", 2) == (
        "CPU AMD EPYC 9654, 2 cores: AVX2, AVX-512, AVX512_VNNI, AVX512_BF16 (native bf16: auto runs bf16)"
    )
    assert describe_cpu(frozenset({"avx2", "avx_vnni"}), "Intel Core", 1) == (
        "CPU Intel Core, 1 core: AVX2, AVX_VNNI (no native bf16: auto runs fp32)"
    )
    assert describe_cpu(frozenset({"avx512f", "amx_bf16", "amx_int8"}), "", 4).endswith(
        "AVX-512, AMX_BF16, AMX_INT8 (native bf16: auto runs bf16)"
    )
    assert describe_cpu().startswith("CPU ")  # this machine's
