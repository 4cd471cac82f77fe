"""The low-precision linear kernels `megaloom quantize` could use, timed against fp32 and
bf16 `nn.Linear` in the same run: fbgemm's dynamic int8 linear (what `--bits 8` uses),
`torch._weight_int8pack_mm` (int8 weight-only), `_weight_int4pack_mm_for_cpu` (bf16
activations) and megaloom's int4 x int8 VNNI kernel (what `--bits 4` uses where the CPU has
VNNI), at decode (batch 1, 8) and prefill (512 rows) sizes of a few projection
shapes. Microseconds per call, best of `--repeats` timings of `--calls` calls.

    python -m benchmarks.quantize_kernels [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine_info, write_json
from megaloom.compress.quantize import (
    Int8Linear,
    bf16_int4_matmul,
    quantize_int4,
    quantize_int8,
    vnni_int4_matmul,
)

SHAPES = [(1024, 1024), (4096, 1024), (1024, 4096), (768, 256), (256, 1024)]


def per_call_us(fn, x, calls: int, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn(x)
            best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def kernels(out_features: int, in_features: int) -> dict:
    linear = torch.nn.Linear(in_features, out_features, bias=False).eval()
    q8, s8 = quantize_int8(linear.weight)
    bf16 = torch.nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16).eval()
    found = {"fp32": linear, "bf16": lambda x: bf16(x.to(torch.bfloat16)),
             "int8 fbgemm dynamic": Int8Linear(q8, s8, None),
             "int8 weight-only (_weight_int8pack_mm)":
                 lambda x: torch._weight_int8pack_mm(x, q8, s8)}
    if in_features % 128 == 0:
        values, scales = quantize_int4(linear.weight, 128)
        found["int4 g128 (_weight_int4pack_mm_for_cpu)"] = bf16_int4_matmul(values, scales, 128)
        vnni = vnni_int4_matmul(values, scales, 128)
        if vnni is not None:
            found["int4 g128 (megaloom: VNNI, bf16 GEMM from 128 rows)"] = vnni
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for out_features, in_features in SHAPES:
        for batch in (1, 8, 512):
            x = torch.randn(batch, in_features)
            timings = {name: per_call_us(fn, x, args.calls if batch < 512 else 5, args.repeats)
                       for name, fn in kernels(out_features, in_features).items()}
            rows.append({"shape": [out_features, in_features], "rows": batch, "us": timings})
            print(f"{out_features}x{in_features} rows {batch:3d}: " + ", ".join(
                f"{name} {us:.0f} us ({timings['fp32'] / us:.2f}x)"
                for name, us in timings.items()), flush=True)
    machine = machine_info()
    print(f"machine: {machine}")
    write_json(args.json, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
