"""Which numeric precision and memory layout a model runs in on this machine, chosen at run time.

``config["precision"]`` is ``"auto"`` (default), ``"fp32"``, ``"bf16"`` or ``"fp16"``; ``fast_path(config, device,
training)`` turns it into a ``FastPath`` (autocast dtype or none, channels_last on/off, a gradient scaler for fp16,
and why).

The rule for ``auto`` (measured with ``python -m trainables.bench --only layouts``; figures in the README):

- CUDA, by the GPU's compute capability (``cuda_capability``; the one table is in docs/training.md): bf16 autocast
  where bf16 is native (>= 8.0: A100, H100, RTX 30xx/40xx); fp16 autocast with a gradient scaler where fp16 is
  fast (6.0 = P100, and >= 7.0 = V100, T4, RTX 20xx: tensor cores); fp32 elsewhere (Maxwell and the consumer
  Pascal cards 6.1/6.2 run fp16 at a fraction of fp32's rate). channels_last in every case. torch's
  ``is_bf16_supported()`` counts emulation by default (below 8.0 it only checks that a bf16 tensor can be
  created): it says yes on a T4, which has no bf16 units.
- CPU with *native* bf16 matrix instructions (x86 AMX-BF16 or AVX512-BF16, Arm BF16), detected from the
  CPU's feature flags, never assumed: bf16 autocast, except for training the depthwise-separable nets
  (mobilenet_v2, mobilenet_v3_large, efficientnet_b0). Their depthwise convolutions are memory-bound and
  gain nothing from bf16 arithmetic, while every layer pays the casts: mobilenet_v2 trains faster in fp32
  channels_last than in bf16 (issue 10's table: 153 vs 135 img/s). In inference (no backward, no casts of
  gradients) bf16 wins for them too.
- CPU without native bf16: fp32. bf16 there is emulated in software, slower than fp32.
- channels_last on every CPU: it beat NCHW for every model measured, in both precisions.
- other devices (Apple MPS): fp32 NCHW, as before.

``"fp32"`` is the reference path: fp32 and NCHW, PyTorch's defaults on every device, what this project ran
before the fast path and what every notebook runs (for parity checks, and the baseline every speed-up is
measured against). ``"bf16"`` forces bf16 autocast with channels_last (emulated, with a warning in the
reason, on a CPU or GPU without native support). ``"fp16"`` forces fp16 autocast with a ``torch.amp.GradScaler``
(the loss is scaled so small fp16 gradients do not flush to zero; steps with inf/NaN gradients are skipped and
the scale lowered); on a CPU it runs, slowly (for tests and parity checks). ``auto`` may thus be faster than ``fp32`` even where it keeps fp32
arithmetic (fp32 channels_last). The request, not its resolution, is what a config carries:
a search, its refit and ``search.predict`` on the same machine resolve it the same way, and each prints or
reports the resolution (``FastPath.name``, the ``fast_path`` epoch metric).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from datasets.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# CPU feature names (torch.cpu.get_capabilities() and /proc/cpuinfo spell them alike) that mean bf16
# matrix arithmetic in hardware.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")
# Depthwise-separable backbones: train fastest in fp32 on CPU (see the module docstring).
FP32_TRAINING_ON_CPU = frozenset({"mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0"})
# Images per forward pass in inference: on CPU, batches of 256 made activations of 30-80 MB that were
# allocated and freed every batch, and the cache misses cost more than larger GEMMs save.
INFERENCE_BATCH = {"cpu": 64}
DEFAULT_INFERENCE_BATCH = 256


def check_precision(value: str, option: str = "precision") -> str:
    if value not in PRECISIONS:
        raise UserError(f"{option} {value!r}: choose one of {', '.join(PRECISIONS)} (auto = bf16 where this "
                        f"machine has native bf16 and the model gains from it, fp16 on older GPUs, else fp32)")
    return value


# --- what the CPU can do ------------------------------------------------------------------------

def _cpuinfo_field(keys: tuple[str, ...], path: str = "/proc/cpuinfo") -> str:
    """Value of the first line of /proc/cpuinfo whose key is one of ``keys`` ("" when absent or unreadable)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return ""


def _proc_cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """Feature flags of the first CPU in /proc/cpuinfo ("flags" on x86, "Features" on Arm)."""
    return frozenset(_cpuinfo_field(("flags", "Features"), path).split())


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: torch's own query (torch.cpu.get_capabilities, in recent torch), else
    /proc/cpuinfo (Linux)."""
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        try:
            return frozenset(k for k, v in caps().items() if v is True)
        except Exception:  # an unknown CPU must not stop training: fall back to the kernel's view
            pass
    return _proc_cpuinfo_flags()


def native_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices in hardware and torch has oneDNN to use it."""
    return torch.backends.mkldnn.is_available() and any(f in cpu_flags() for f in NATIVE_BF16_FLAGS)


def cpu_summary() -> str:
    """One line for benchmark and log headers: CPU model, bf16 flags, what auto makes of them."""
    flags = cpu_flags()
    found = [f for f in ("amx_bf16", "avx512_bf16", "avx512_f", "avx512f", "avx2", "bf16", "sve_bf16") if f in flags]
    return (f"{platform.processor() or platform.machine()} {_cpu_model()}; flags {' '.join(found) or 'none of note'}; "
            f"torch kernels {torch.backends.cpu.get_cpu_capability()}; "
            f"native bf16 {'yes' if native_bf16() else 'no (auto uses fp32)'}")


def _cpu_model() -> str:
    return _cpuinfo_field(("model name",))


# --- the choice ---------------------------------------------------------------------------------

# --- what the GPU can do ------------------------------------------------------------------------

def cuda_capability(device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (tests fake it)."""
    return tuple(torch.cuda.get_device_capability(device))


def gpu_precision(capability: tuple[int, int]) -> str:
    """auto's choice on a GPU of this compute capability: bf16 where native, fp16 where fast, else fp32."""
    if capability >= (8, 0):
        return "bf16"
    if capability == (6, 0) or capability >= (7, 0):
        return "fp16"
    return "fp32"


@dataclass(frozen=True)
class FastPath:
    device_type: str
    bf16: bool
    channels_last: bool
    reason: str = ""
    fp16: bool = False  # fp16 autocast + a gradient scaler

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def name(self) -> str:
        return f"{self.precision} {'channels_last' if self.channels_last else 'NCHW'}"

    @property
    def input_dtype(self) -> torch.dtype:
        """What the data path delivers: bf16 for a bf16 model (autocast would round the input to bf16 at
        its first layer anyway), else fp32 (autocast casts it for an fp16 model)."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self):
        if not (self.bf16 or self.fp16):
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16 if self.bf16 else torch.float16)

    def grad_scaler(self):
        """A torch.amp.GradScaler for fp16 training, else None (bf16 has fp32's range: nothing to scale)."""
        return torch.amp.GradScaler(self.device_type) if self.fp16 else None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model in this path's layout (in place, as Module.to is)."""
        return model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def inference_batch(self) -> int:
        return INFERENCE_BATCH.get(self.device_type, DEFAULT_INFERENCE_BATCH)


def choose(precision: str, backbone: str, device: torch.device | str, training: bool = True) -> FastPath:
    """The FastPath for ``precision`` (auto | fp32 | bf16 | fp16) of ``backbone`` on ``device``."""
    check_precision(precision)
    dev = torch.device(device).type
    if precision == "fp32":
        return FastPath(dev, False, False, "precision fp32 requested: the reference path, PyTorch's defaults")
    if dev == "cuda":
        return _cuda_path(precision, torch.device(device))
    if precision == "fp16":
        return FastPath(dev, False, dev == "cpu", f"precision fp16 requested (with a gradient scaler)"
                        + ("; on a CPU it is slower than fp32" if dev == "cpu" else ""), fp16=True)
    if dev != "cpu":
        return FastPath(dev, False, False, f"{dev}: fp32 NCHW (bf16 autocast not used on this device)")
    native = native_bf16()
    if precision == "bf16":
        why = "precision bf16 requested" + ("" if native else
                                             "; this CPU has no native bf16: emulated, slower than fp32")
        return FastPath("cpu", True, True, why)
    if not native:
        return FastPath("cpu", False, True, "auto: this CPU has no native bf16, fp32")
    if training and backbone in FP32_TRAINING_ON_CPU:
        return FastPath("cpu", False, True, f"auto: {backbone} (depthwise convolutions) trains faster in fp32")
    return FastPath("cpu", True, True, "auto: this CPU has native bf16")


def _cuda_path(precision: str, device: torch.device) -> FastPath:
    cap = cuda_capability(device)
    best = gpu_precision(cap)
    where = f"CUDA compute capability {cap[0]}.{cap[1]}"
    if precision == "auto":
        why = {"bf16": "native bf16", "fp16": "no native bf16, fast fp16: fp16 with a gradient scaler",
               "fp32": "no native bf16 and slow fp16: fp32"}[best]
        return FastPath("cuda", best == "bf16", True, f"auto: {where}, {why}", fp16=best == "fp16")
    if precision == "bf16":
        return FastPath("cuda", True, True, f"precision bf16 requested on {where}"
                        + ("" if best == "bf16" else ": no native bf16, emulated, slower"))
    return FastPath("cuda", False, True, f"precision fp16 requested on {where} (with a gradient scaler)"
                    + ("" if best != "fp32" else ": slow fp16 on this GPU"), fp16=True)


# --- the allocator ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def reuse_freed_memory() -> bool:
    """Make glibc keep large freed blocks for reuse instead of unmapping them.

    glibc serves allocations above its mmap threshold (at most 32 MB by default) with a fresh mmap and
    unmaps them on free, so every batch's activations and augmented images were new pages, zeroed by
    the kernel: inference spent more system time than user time, and the data path half its time in
    page faults. With the threshold and trim limit at 1 GB the process reuses its heap (its memory
    use stays at its peak). Process-wide and idempotent; a no-op (False) off glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
        limit = 1 << 30
        # Older glibc caps the mmap threshold at 32 MB (HEAP_MAX/2): try the cap then.
        ok = libc.mallopt(M_MMAP_THRESHOLD, limit) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        return bool(ok and libc.mallopt(M_TRIM_THRESHOLD, limit))
    except (OSError, AttributeError):
        return False
