"""The int4-weight, int8-activation linear kernel for x86 CPUs with AVX-512 VNNI, compiled
from `w4a8.cpp` with PyTorch's extension builder on first use and cached (under
`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`).

Why a kernel of our own: on this project's CPUs none at hand made int4 decode faster than
int8 (`benchmarks/quantize_kernels.py`): `_weight_int4pack_mm_for_cpu` converts the weights
to bf16 and runs 2-3x slower than fbgemm's int8 at batch 1, `_dyn_quant_matmul_4bit` is a
reference loop off ARM, and torchao's PyPI wheel carries no x86 CPU kernels. This one reads
half of int8's weight bytes and does its arithmetic in VNNI int8 dot products.

From `GEMM_ROWS` input rows on (prompts, not decode steps) a bf16 GEMM on weights
dequantised per call (`dequantize_bf16`, in the same extension) beats the int8 dot products:
measured crossover between 64 and 128 rows on this project's CPU at every projection shape of
`benchmarks/quantize_kernels.py`.

`extension()` is None where the CPU lacks the instructions or the build fails; callers then
use `_weight_int4pack_mm_for_cpu` and the log says which kernel runs and why.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("w4a8.cpp")
BLOCK = 128  # inputs per packed 64-byte block; groups must be whole blocks
GEMM_ROWS = 128  # from this many input rows on, dequantise to bf16 and run a GEMM
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"]


def missing_cpu_support() -> str | None:
    """Why this machine cannot run the kernel, or None when it can."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"it needs x86-64 Linux, this is {platform.system()} {platform.machine()}"
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    missing = [flag for flag in REQUIRED_FLAGS if flag not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


@functools.cache
def extension() -> ModuleType | None:
    """The compiled module (`linear(x, packed, scales, group)`,
    `dequantize_bf16(packed, scales, group)`), or None (the reason is logged)."""
    reason = missing_cpu_support()
    if reason is None:
        from torch.utils import cpp_extension

        log.info("loading the int4 x int8 VNNI kernel (compiled once, about 30 s)")
        try:
            return cpp_extension.load("megaloom_w4a8", [str(SOURCE)],
                                      extra_cflags=COMPILE_FLAGS)
        except (OSError, RuntimeError, ImportError) as exc:
            reason = f"its build failed: {str(exc).splitlines()[0] if str(exc) else exc!r}"
    log.warning("int4 layers run _weight_int4pack_mm_for_cpu (bf16 activations), not the "
                "VNNI kernel: %s", reason)
    return None


def pack_blocks(values: torch.Tensor) -> torch.Tensor:
    """(rows, cols) values in [0, 15] -> (rows, cols / 2) bytes in the kernel's layout: in
    each block of 128 inputs, byte j holds input j (low nibble) and input 64 + j (high)."""
    rows, cols = values.shape
    blocks = values.to(torch.uint8).reshape(rows, cols // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(rows, cols // 2).contiguous()
