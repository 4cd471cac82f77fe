"""Weight quantisation for CPU inference (`megaloom quantize`): int8 per output channel and
int4 per group, symmetric, each run by a real low-precision CPU kernel.

- **int8**: weights `round(W / s)` with `s = max|W_row| / 127`, run by fbgemm's dynamic
  quantised linear (`quantized::linear_dynamic`: int8 weights, activations quantised to
  8 bits per call from their own range, int32 accumulation). Measured against the weight-only
  kernels on this project's CPUs (`benchmarks/quantize_kernels.py`): `_weight_int8pack_mm`
  and torchao's int8 weight-only layouts run slower than fp32 there, fbgemm several times
  faster, so int8 uses fbgemm.
- **int4**: weights `round(W / s) + 8` in [0, 15] with `s = max|W_group| / 7` per group of
  `group_size` inputs, run by megaloom's own AVX-512 VNNI kernel (`megaloom.compress.w4a8`:
  half of int8's weight bytes, activations quantised to int8 per call like fbgemm's), or by
  `_weight_int4pack_mm_for_cpu` (bf16 activations) on CPUs without VNNI and for groups
  smaller than 128; the log names the kernel that runs.

The stored form is the kernel-independent one: `NAME.qweight` (int8, or uint8 holding two
4-bit values per byte) and `NAME.scales` (float32) beside the unquantised tensors in an
ordinary weights-only checkpoint, described by `quantization.json`; kernels' packed layouts
are built at load time. Embeddings, norms, biases and the output head stay in float.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from megaloom.compress import w4a8
from megaloom.config import PROJECTIONS
from megaloom.errors import CheckpointError, MegaloomError

log = logging.getLogger(__name__)

QUANT_FILE = "quantization.json"
SCHEMES = {8: "int8 per output channel, fbgemm dynamic linear",
           4: "int4 per group, int4 x int8 VNNI kernel (or _weight_int4pack_mm_for_cpu)"}


@dataclass(frozen=True)
class QuantSpec:
    """What to quantise: `bits` (8 or 4), `group_size` (inputs per int4 scale; int8 uses one
    scale per output channel), and the projection kinds left in float (`skip`)."""

    bits: int
    group_size: int | None = None
    skip: tuple[str, ...] = ()

    @classmethod
    def checked(cls, bits: int, group_size: int | None, skip: list[str]) -> QuantSpec:
        if bits not in SCHEMES:
            raise MegaloomError(f"--bits must be 8 or 4, got {bits}")
        if bits == 8 and group_size is not None:
            raise MegaloomError("--group-size is for --bits 4 (int8 keeps one scale per "
                                "output channel)")
        if bits == 4:
            group_size = 128 if group_size is None else group_size
            if group_size not in (32, 64, 128, 256):
                raise MegaloomError(f"--group-size must be 32, 64, 128 or 256 (the int4 "
                                    f"kernel's groups), got {group_size}")
        unknown = sorted(set(skip) - set(PROJECTIONS))
        if unknown:
            raise MegaloomError(f"--skip: unknown projection {', '.join(unknown)} (choose from "
                                f"{', '.join(PROJECTIONS)}; the output head is never "
                                "quantised)")
        return cls(bits, group_size, tuple(skip))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per output row) with `weight ~= values * scale[:, None]`."""
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)
    return torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 values in [0, 15], float32 scales (out, in / group)) with
    `weight ~= (values - 8) * scale` of each value's group."""
    weight = weight.detach().float()
    rows, cols = weight.shape
    groups = weight.view(rows, cols // group_size, group_size)
    scales = (groups.abs().amax(dim=-1) / 7).clamp_min(1e-12)
    values = torch.round(groups / scales[..., None]).clamp_(-8, 7) + 8
    return values.to(torch.uint8).view(rows, cols), scales


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte: (rows, cols) -> (rows, cols / 2), even columns low."""
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


class Int8Linear(nn.Module):
    """`x @ (q * s)^T + b` through fbgemm's dynamic int8 linear."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.float())
        with warnings.catch_warnings():  # quantized tensors: deprecated, still fbgemm's input
            warnings.filterwarnings("ignore", message=".*quantized tensor creation")
            quantized = torch._make_per_channel_quantized_tensor(
                qweight, scales.double(), torch.zeros(self.out_features, dtype=torch.int64), 0)
        self._packed = torch.ops.quantized.linear_prepack(quantized, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self._packed, True).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]


def vnni_int4_matmul(values: torch.Tensor, scales: torch.Tensor, group_size: int):
    """`x -> x @ ((values - 8) * scales)^T` (float32) through the int4 x int8 VNNI kernel (a
    bf16 GEMM on weights dequantised per call from `w4a8.GEMM_ROWS` rows on), or None where
    it cannot run (no VNNI, or groups that are not whole 128-input blocks)."""
    kernels = w4a8.extension() if group_size % w4a8.BLOCK == 0 else None
    if kernels is None:
        return None
    packed, kernel_scales = w4a8.pack_blocks(values), scales.float().contiguous()

    def matmul(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < w4a8.GEMM_ROWS:
            return kernels.linear(x.float().contiguous(), packed, kernel_scales, group_size)
        _note_prompt_gemm()
        weight = kernels.dequantize_bf16(packed, kernel_scales, group_size)
        return (x.to(torch.bfloat16) @ weight.t()).float()

    return matmul


def bf16_int4_matmul(values: torch.Tensor, scales: torch.Tensor, group_size: int):
    """The same product through `_weight_int4pack_mm_for_cpu` with bf16 activations."""
    packed = torch._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1)
    # the kernel computes (q - 8) * scale + zero per group; zero = 0 (symmetric)
    scales_zeros = torch.stack([scales.t(), torch.zeros_like(scales.t())],
                               dim=-1).to(torch.bfloat16).contiguous()
    return lambda x: torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed,
                                                       group_size, scales_zeros)


class Int4Linear(nn.Module):
    """`x @ ((q - 8) * s)^T + b`: through the int4 x int8 VNNI kernel
    (`megaloom.compress.w4a8`) where the CPU has it and the groups are whole 128-input
    blocks, else through `_weight_int4pack_mm_for_cpu` in bf16 (`kernel_name` says which)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.float())
        values = unpack_nibbles(qweight)
        self._matmul = vnni_int4_matmul(values, scales, group_size)
        self.kernel_name = "w4a8 VNNI"
        if self._matmul is None:
            if group_size % w4a8.BLOCK:
                _note_small_groups(group_size)
            self._matmul = bf16_int4_matmul(values, scales, group_size)
            self.kernel_name = "_weight_int4pack_mm_for_cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self._matmul(x.reshape(-1, shape[-1])).view(*shape[:-1], -1)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        values = unpack_nibbles(self.qweight).float() - 8
        groups = values.view(self.out_features, -1, self.group_size)
        return (groups * self.scales[..., None]).view(self.out_features, self.in_features)


@functools.cache
def _note_prompt_gemm() -> None:
    log.info("int4 layers: inputs of %d rows or more (prompts) run a bf16 GEMM on weights "
             "dequantised per call, faster there than the int8 dot products", w4a8.GEMM_ROWS)


@functools.cache
def _note_small_groups(group_size: int) -> None:
    log.info("int4 groups of %d inputs are not whole %d-input blocks of the VNNI kernel: "
             "those layers run _weight_int4pack_mm_for_cpu", group_size, w4a8.BLOCK)


def projections(model: nn.Module, spec: QuantSpec) -> Iterator[tuple[str, nn.Module, str]]:
    """(parent module name, parent, attribute) of every linear projection `spec` quantises."""
    for name, module in model.named_modules():
        for kind in PROJECTIONS:
            weight = getattr(getattr(module, kind, None), "weight", None)
            if kind not in spec.skip and isinstance(weight, nn.Parameter) and weight.ndim == 2:
                yield name, module, kind


def quantized_linear(linear: nn.Module, spec: QuantSpec) -> nn.Module:
    """The quantised replacement of a linear layer (plain or a one-rank parallel one)."""
    bias = None if linear.bias is None else linear.bias.detach()
    if spec.bits == 8:
        return Int8Linear(*quantize_int8(linear.weight), bias)
    if linear.weight.shape[1] % spec.group_size:
        raise MegaloomError(f"--group-size {spec.group_size} does not divide the input width "
                            f"{linear.weight.shape[1]} of a projection")
    values, scales = quantize_int4(linear.weight, spec.group_size)
    return Int4Linear(pack_nibbles(values), scales, bias, spec.group_size)


def quantize_model(model: nn.Module, spec: QuantSpec) -> dict:
    """Replace `model`'s projections by quantised ones, in place; return the report."""
    if any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()):
        raise MegaloomError("the model is already quantised; quantise its float checkpoint")
    names = []
    for name, parent, kind in list(projections(model, spec)):
        setattr(parent, kind, quantized_linear(getattr(parent, kind), spec))
        names.append(f"{name}.{kind}")
    if not names:
        raise MegaloomError("nothing to quantise: every projection kind is in --skip")
    return {"bits": spec.bits, "group_size": spec.group_size, "scheme": SCHEMES[spec.bits],
            "skip": list(spec.skip), "quantized": names}


def read_spec(directory: Path) -> tuple[QuantSpec, list[str]] | None:
    """The `QuantSpec` and module names of a quantised checkpoint directory (None: not one)."""
    from megaloom.checkpoint.files import read_json_object

    path = directory / QUANT_FILE
    if not path.is_file():
        return None
    data = read_json_object(path)
    try:
        spec = QuantSpec.checked(data["bits"], data.get("group_size"), data.get("skip", []))
        return spec, [str(name) for name in data["quantized"]]
    except (KeyError, TypeError, MegaloomError) as exc:
        raise MegaloomError(f"{path}: not a valid quantisation description ({exc})") from exc


def refuse_quantized(directory: Path, use: str) -> None:
    """An error when `directory` holds a quantised checkpoint, which only inference reads."""
    if (directory / QUANT_FILE).is_file():
        raise MegaloomError(f"{directory} is a quantised checkpoint ({QUANT_FILE}): it is "
                            f"for inference (generate, serve, evaluate), not for "
                            f"{use}; use the float checkpoint it was made from")


class QuantizedParallelLinear(nn.Module):
    """A tensor-parallel projection whose local matmul is a quantised kernel: column-parallel
    (output rows split, input replicated) or row-parallel (input columns split, partial
    outputs all-reduced, then the replicated bias). With one rank both are the plain layer.
    Under tp, row-parallel int8 layers quantise each rank's activation slice from its own
    range, so their outputs differ from one process's within that activation step."""

    def __init__(self, kernel: nn.Module, bias: torch.Tensor | None, axis, row: bool):
        super().__init__()
        self.kernel, self.axis, self.row = kernel, axis, row
        self.in_features, self.out_features = kernel.in_features, kernel.out_features  # local
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megaloom.parallel.mappings import copy_to, reduce_from

        y = self.kernel(x if self.row else copy_to(x, self.axis))
        if self.row:
            y = reduce_from(y, self.axis)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def read_quantized(store, name: str, layer: nn.Module, spec: QuantSpec, axis
                   ) -> QuantizedParallelLinear:
    """This rank's shard of the stored quantised projection `name`, for the (meta)
    tensor-parallel `layer` it replaces: only its rows (column-parallel) or input columns
    (row-parallel) of the integers and scales are read."""
    from megaloom.parallel.layers import RowParallelLinear, shard_box

    row = isinstance(layer, RowParallelLinear)
    _, ((r0, r1), (c0, c1)) = shard_box(layer.weight, axis)
    if (r1 - r0, c1 - c0) != tuple(layer.weight.shape):
        raise MegaloomError(f"{name}: its {tuple(layer.weight.shape)} shard does not split "
                            f"evenly over {axis.size} tensor-parallel ranks")
    if spec.bits == 8:
        kernel = Int8Linear(store.read(f"{name}.qweight", ((r0, r1), (c0, c1))),
                            store.read(f"{name}.scales", ((r0, r1),)), None)
    else:
        group = spec.group_size
        if c0 % group or c1 % group:
            raise MegaloomError(f"{name}: each rank's {c1 - c0} input columns must be whole "
                                f"groups of {group} (quantise with a smaller --group-size, "
                                "or use fewer ranks)")
        kernel = Int4Linear(store.read(f"{name}.qweight", ((r0, r1), (c0 // 2, c1 // 2))),
                            store.read(f"{name}.scales", ((r0, r1), (c0 // group, c1 // group))),
                            None, group)
    bias = None
    if layer.bias is not None:
        bias = store.read(f"{name}.bias", None if row else ((r0, r1),))
    return QuantizedParallelLinear(kernel, bias, axis, row)


def load_quantized_shard(directory: Path, spec: QuantSpec, names: list[str], topo):
    """This rank's shard of a quantised checkpoint on `topo` (one process: the whole model):
    built on `meta` and split as for training, each stored projection's shard read into a
    quantised kernel, then the float tensors (embeddings, norms, head) read as their boxes.
    Returns (model, config, tokenizer path)."""
    from megaloom.checkpoint.reader import open_checkpoint
    from megaloom.model.gpt import GPT
    from megaloom.parallel.build import materialize
    from megaloom.parallel.parallelize import parallelize

    if topo.device.type != "cpu":
        raise MegaloomError(f"{directory}: quantised models run on CPU kernels only (asked "
                            f"for {topo.device}); use the float checkpoint on accelerators")
    checkpoint = open_checkpoint(directory)
    config = checkpoint.config
    with torch.device("meta"):
        model = GPT(config.model)
    parallelize(model, topo)
    for name in names:
        parent_name, _, kind = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            layer = read_quantized(checkpoint.store, name, getattr(parent, kind), spec,
                                   topo.tp_axis)
        except (AttributeError, CheckpointError) as exc:
            raise MegaloomError(f"{directory}: quantised projection {name} is missing or does "
                                f"not fit the model ({exc})") from exc
        setattr(parent, kind, layer)
    return materialize(model, topo, checkpoint).eval(), config, checkpoint.tokenizer
