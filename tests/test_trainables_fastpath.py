"""The CPU fast path is chosen at run time from the CPU's flags: both ways, the detection itself,
the explicit options, and the allocator setting that keeps inference out of the kernel."""
from __future__ import annotations

import platform
import resource
from pathlib import Path

import pytest
import torch

from datasets.errors import UserError
from trainables import fastpath
from trainables.fastpath import FP32_TRAINING_ON_CPU, NATIVE_BF16_FLAGS, choose, native_bf16
from trainables.train import resolve_config


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has exactly the given feature flags."""
    def set_flags(*flags: str) -> None:
        monkeypatch.setattr(fastpath, "cpu_flags", lambda: frozenset(flags))
    return set_flags


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu_with):
    cpu_with("avx2", "avx512f")                 # AVX-512 but no bf16 instructions: bf16 would be emulated
    assert not native_bf16()
    for backbone in ("baseline_bn", "resnet18", "mobilenet_v2"):
        for training in (True, False):
            path = choose("auto", backbone, "cpu", training)
            assert not path.bf16 and path.channels_last and "no native bf16" in path.reason


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_is_bf16_where_native_except_training_depthwise_nets(cpu_with, flag):
    cpu_with("avx2", flag)
    assert native_bf16()
    assert choose("auto", "baseline_bn", "cpu").name == "bf16 channels_last"
    assert choose("auto", "resnet18", "cpu").name == "bf16 channels_last"
    assert choose("auto", "mobilenet_v2", "cpu", training=True).name == "fp32 channels_last"
    assert choose("auto", "mobilenet_v2", "cpu", training=False).name == "bf16 channels_last"


def test_on_this_cpu_auto_follows_the_rule():
    """No monkeypatching: whatever this machine is, auto must match its real flags."""
    native = native_bf16()
    for backbone in ("baseline_bn", "resnet18", "mobilenet_v2", "efficientnet_b0"):
        expected = native and backbone not in FP32_TRAINING_ON_CPU
        assert choose("auto", backbone, "cpu", training=True).bf16 == expected, (backbone, fastpath.cpu_summary())
        assert choose("auto", backbone, "cpu", training=False).bf16 == native


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or platform.machine() != "x86_64",
                    reason="needs Linux /proc/cpuinfo on x86-64")
def test_torch_and_the_kernel_agree_on_the_bf16_flags():
    kernel = fastpath._proc_cpuinfo_flags() & set(NATIVE_BF16_FLAGS)
    assert fastpath.cpu_flags() & set(NATIVE_BF16_FLAGS) == kernel
    assert native_bf16() == (bool(kernel) and torch.backends.mkldnn.is_available())


def test_proc_cpuinfo_parsing(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16 amx_tile\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert fastpath._proc_cpuinfo_flags(str(x86)) == {"fpu", "avx2", "avx512_bf16", "amx_tile"}
    assert "bf16" in fastpath._proc_cpuinfo_flags(str(arm))
    assert fastpath._proc_cpuinfo_flags(str(tmp_path / "absent")) == frozenset()


def test_explicit_precision_wins_and_emulated_bf16_says_so(cpu_with):
    cpu_with("avx512_bf16")
    ref = choose("fp32", "baseline_bn", "cpu")
    assert (ref.bf16, ref.channels_last) == (False, False)          # the reference path: PyTorch's defaults
    assert choose("fp32", "baseline_bn", "cuda").name == "fp32 NCHW"
    cpu_with("avx2")
    forced = choose("bf16", "baseline_bn", "cpu")
    assert forced.bf16 and "emulated" in forced.reason


def test_bad_precision_is_a_one_line_user_error():
    with pytest.raises(UserError, match="precision 'fp8'.*auto, fp32, bf16, fp16"):
        resolve_config({"precision": "fp8"})
    assert resolve_config({})["precision"] == "auto"  # old configs/model files without the key: auto


def test_fast_path_autocast_and_layout():
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.rand(2, 3, 8, 8)
    bf16 = fastpath.FastPath("cpu", True, True)
    fp32 = fastpath.FastPath("cpu", False, False)
    with bf16.autocast():
        assert conv(x).dtype == torch.bfloat16
    with fp32.autocast():
        assert conv(x).dtype == torch.float32
    assert bf16.prepare_input(x).is_contiguous(memory_format=torch.channels_last)
    assert bf16.prepare_model(conv).weight.is_contiguous(memory_format=torch.channels_last)
    assert fp32.prepare_model(conv).weight.is_contiguous()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_activations_are_reused_not_faulted_in_again():
    assert fastpath.reuse_freed_memory()
    big = 64 << 20  # bytes: far above glibc's default mmap threshold

    def faults_of_one_batch() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.ones(big // 4)  # touches every page, as activations do
        del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    # glibc settles on a reusable layout within a few rounds (8 here: torch's 64-byte-aligned blocks
    # do not fit the hole a same-sized one left until neighbouring holes coalesce).
    for _ in range(16):
        faults_of_one_batch()
    # Without reuse every batch maps fresh pages: big / 4 KiB = 16,384 faults each time.
    assert faults_of_one_batch() < 1000


# --- GPUs: the precision by compute capability (faked: this machine has none) ----------------------

@pytest.fixture
def gpu_with(monkeypatch):
    """Pretend the CUDA device has the given compute capability."""
    def set_capability(major: int, minor: int) -> None:
        monkeypatch.setattr(fastpath, "cuda_capability", lambda device: (major, minor))
    return set_capability


@pytest.mark.parametrize("capability, auto", [
    ((6, 0), "fp16"),   # P100: fast fp16, no bf16
    ((6, 1), "fp32"),   # GTX 10xx: fp16 at a fraction of fp32's rate
    ((7, 0), "fp16"),   # V100: tensor cores
    ((7, 5), "fp16"),   # T4 (Kaggle): tensor cores, bf16 only emulated
    ((8, 0), "bf16"),   # A100
    ((9, 0), "bf16"),   # H100
])
def test_auto_on_a_gpu_is_bf16_only_where_native_else_fp16_with_a_scaler(gpu_with, capability, auto):
    gpu_with(*capability)
    for backbone in ("baseline_bn", "mobilenet_v2"):  # no depthwise exception on a GPU
        path = choose("auto", backbone, "cuda", training=True)
        assert path.precision == auto and path.channels_last
        assert f"capability {capability[0]}.{capability[1]}" in path.reason
        assert isinstance(path.grad_scaler(), torch.amp.GradScaler) == (auto == "fp16")
        # The autocast it would enter (torch disables a CUDA autocast on a machine without CUDA, so its
        # settings are read, not its effect).
        ctx = path.autocast()
        want = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[auto]
        if want is None:
            assert not isinstance(ctx, torch.autocast)
        else:
            assert isinstance(ctx, torch.autocast) and (ctx.device, ctx.fast_dtype) == ("cuda", want)


def test_forced_precisions_on_a_gpu_say_when_they_are_emulated_or_slow(gpu_with):
    gpu_with(7, 5)
    forced = choose("bf16", "baseline_bn", "cuda:0")
    assert forced.bf16 and "emulated" in forced.reason and forced.grad_scaler() is None
    assert choose("fp16", "baseline_bn", "cuda").fp16 and choose("fp32", "baseline_bn", "cuda").name == "fp32 NCHW"
    gpu_with(9, 0)
    assert choose("fp16", "baseline_bn", "cuda").name == "fp16 channels_last"
    gpu_with(5, 2)
    assert choose("auto", "baseline_bn", "cuda").name == "fp32 channels_last"
    assert "slow fp16" in choose("fp16", "baseline_bn", "cuda").reason


@pytest.mark.parametrize("flags", [("avx2",), ("avx512_bf16",)])
def test_fp16_on_a_cpu_is_honoured_with_a_scaler_whatever_its_bf16(cpu_with, flags):
    cpu_with(*flags)
    path = choose("fp16", "baseline_bn", "cpu")
    assert path.name == "fp16 channels_last" and not path.bf16 and "slower than fp32" in path.reason
    assert isinstance(path.grad_scaler(), torch.amp.GradScaler)
    conv = torch.nn.Conv2d(3, 4, 3)
    with path.autocast():
        assert conv(torch.rand(2, 3, 8, 8)).dtype == torch.float16
    # auto never picks fp16 on a CPU
    assert choose("auto", "baseline_bn", "cpu").precision == ("bf16" if "avx512_bf16" in flags else "fp32")
