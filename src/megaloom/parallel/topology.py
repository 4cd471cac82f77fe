"""The parallel layout: named axes `tp`, `pp`, `dp`, their ranks and process groups.

A `Topology` is built once per layout and passed explicitly (no module-level globals); several
can live in one process. Ranks are laid out Megatron-style, tensor-parallel fastest:
`rank = tp_rank + tp * (dp_rank + dp * pp_rank)`, so a tp group is a block of neighbouring
ranks (one node, fast links). Each `Axis` wraps the collectives over its group and counts the
elements a ring algorithm sends per rank, which `benchmarks/parallel_overhead.py` reports.
World size 1 needs no `init_process_group`: every axis has size 1 and its collectives are no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from megaloom.utils.launch import Launch

# torch >= 2.13 renames reduce_scatter_tensor (and deprecates the old name).
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
PATIENT_TIMEOUT = timedelta(hours=6)


@dataclass
class Axis:
    """One process group with its collectives; `sent` counts ring-algorithm elements per rank."""

    name: str
    size: int
    rank: int
    ranks: list[int]
    group: dist.ProcessGroup | None = None
    sent: dict[str, int] = field(default_factory=dict)
    timeout: timedelta | None = None  # for waits on asynchronous work (p2p has no own bound)

    def wait(self, work: dist.Work) -> None:
        """Wait for asynchronous `work`, failing after `timeout` (when set)."""
        if self.timeout is None:
            work.wait()
        else:
            work.wait(self.timeout)

    def count(self, op: str, elements: float) -> None:
        """Add `elements` sent by this rank in an operation of kind `op`."""
        self.sent[op] = self.sent.get(op, 0) + int(elements)

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce; returns `tensor`."""
        if self.size > 1:
            self.count("all_reduce", 2 * tensor.numel() * (self.size - 1) / self.size)
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, in axis-rank order."""
        if self.size == 1:
            return tensor
        self.count("all_gather", tensor.numel() * (self.size - 1))
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, tensor: torch.Tensor, dim: int,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over ranks, then keep this rank's chunk along `dim` (which must divide evenly),
        written into `out` when given."""
        if self.size == 1:
            return tensor if out is None else out.copy_(tensor)
        if tensor.shape[dim] % self.size:
            raise ValueError(f"{self.name}: dim {dim} of size {tensor.shape[dim]} does not split "
                             f"into {self.size} equal parts")
        self.count("reduce_scatter", tensor.numel() * (self.size - 1) / self.size)
        if dim == 0 and tensor.is_contiguous():  # the chunks already lie one after another
            chunks = tensor.view(self.size, -1)
            shape = (tensor.shape[0] // self.size, *tensor.shape[1:])
        else:
            chunks = torch.stack(tensor.chunk(self.size, dim=dim))
            shape = chunks.shape[1:]
        if out is None:
            out = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        _reduce_scatter_single(out.view(-1), chunks.reshape(-1), group=self.group)
        return out.view(shape)

    def chunk(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of `tensor` along `dim` (no communication)."""
        if self.size == 1:
            return tensor
        if tensor.shape[dim] % self.size:
            raise ValueError(f"{self.name}: dim {dim} of size {tensor.shape[dim]} does not split "
                             f"into {self.size} equal parts")
        return tensor.chunk(self.size, dim=dim)[self.rank].contiguous()

    def reset_counts(self) -> None:
        self.sent.clear()


@dataclass
class Topology:
    """Sizes, this process's coordinates and the groups of a (tp, pp, dp) layout.

    `mp` is the model-parallel group (all tp x pp ranks of one data-parallel replica);
    `embed` joins the first and last pipeline stage (tied embedding gradients).
    `patient_group` (gloo, all ranks) carries waits that may legitimately take long (data
    caches built by one rank, checkpoint files written): `parallel.timeout_s` bounds the
    training collectives, not those.
    """

    tp: int
    pp: int
    dp: int
    rank: int
    device: torch.device
    tp_axis: Axis
    pp_axis: Axis
    dp_axis: Axis
    mp_axis: Axis
    world_axis: Axis
    embed_axis: Axis
    patient_group: dist.ProcessGroup | None = None
    local_rank: int = 0  # this process's index on its node (the launcher's LOCAL_RANK)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_axis.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_axis.rank == self.pp - 1

    def axes(self) -> dict[str, Axis]:
        return {"tp": self.tp_axis, "pp": self.pp_axis, "dp": self.dp_axis}

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, device: torch.device | str | None = None, *,
              virtual: tuple[int, int] | None = None,
              timeout: timedelta | None = None) -> Topology:
        """Build the layout over the default process group (or a single process when none).
        `timeout` bounds waits on asynchronous work (pipeline transfers, overlapped
        reductions) like the process group's own timeout bounds its collectives.

        `virtual=(world_size, rank)` describes that rank of a layout without any process group
        (its collectives must not be called): for counting a rank's shapes on `meta`."""
        if virtual is not None:
            world, rank = virtual
        else:
            world = dist.get_world_size() if dist.is_initialized() else 1
            rank = dist.get_rank() if dist.is_initialized() else 0
        if tp < 1 or pp < 1 or world % (tp * pp):
            raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
        dp = world // (tp * pp)
        device = torch.device(device) if device is not None else default_device()

        def coords(r: int) -> tuple[int, int, int]:
            return r % tp, (r // tp) % dp, r // (tp * dp)

        def rank_of(t: int, d: int, p: int) -> int:
            return t + tp * (d + dp * p)

        t0, d0, p0 = coords(rank)
        families = {
            "tp": [[rank_of(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
            "dp": [[rank_of(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
            "pp": [[rank_of(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
            "mp": [[rank_of(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)],
            "world": [list(range(world))],
            "embed": [sorted({rank_of(t, d, 0), rank_of(t, d, pp - 1)})
                      for d in range(dp) for t in range(tp)],
        }
        axes = {name: _make_axis(name, groups, rank, virtual is None, timeout)
                for name, groups in families.items()}
        patient = (dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
                   if virtual is None and world > 1 else None)
        return cls(tp=tp, pp=pp, dp=dp, rank=rank, device=device, tp_axis=axes["tp"],
                   pp_axis=axes["pp"], dp_axis=axes["dp"], mp_axis=axes["mp"],
                   world_axis=axes["world"], embed_axis=axes["embed"], patient_group=patient,
                   local_rank=0 if virtual is not None else Launch.from_environment().local_rank)


def _make_axis(name: str, groups: list[list[int]], rank: int, create: bool = True,
               timeout: timedelta | None = None) -> Axis:
    """Create every group of a family (all ranks must create all groups, in the same order)."""
    mine = next((ranks for ranks in groups if rank in ranks), [rank])  # middle stages: no embed
    handle = None
    if create and len(mine) > 1:
        for ranks in groups:
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                handle = group
    return Axis(name=name, size=len(mine), rank=mine.index(rank), ranks=mine, group=handle,
                timeout=timeout)


def default_device() -> torch.device:
    """The local accelerator when there is one (one per local rank), else the CPU."""
    if torch.accelerator.is_available():
        return Launch.from_environment().device(torch.accelerator.current_accelerator())
    return torch.device("cpu")


def init_distributed(device: torch.device | None = None,
                     timeout: timedelta | None = None) -> None:
    """Join the torchrun job described by the environment (no-op for a single process).

    The backend follows the device: gloo on CPU, NCCL on CUDA (torch's default per device).
    `timeout` bounds every collective: a rank that waits longer for a peer (one that died or
    hangs) fails with an error instead of hanging (`parallel.timeout_s`).
    """
    launch = Launch.from_environment()
    if dist.is_initialized() or launch.world_size <= 1:
        return
    device = device or default_device()
    backend = dist.Backend.default_device_backend_map.get(device.type, "gloo")
    if device.type != "cpu":
        torch.accelerator.set_device_index(device.index or 0)
    rank, world = launch.rank, launch.world_size
    store, _, _ = next(dist.rendezvous("env://", rank, world,
                                       timeout=timeout or timedelta(minutes=10)))
    # An elastic restart may reuse the agent's store: keys of the failed attempt (stale peer
    # addresses) must not be read, so every attempt gets its own prefix.
    store = dist.PrefixStore(f"megaloom/attempt_{launch.attempt}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                            timeout=timeout)


def leave_distributed() -> None:
    """Leave the job cleanly after a command succeeded: wait for every rank (so no rank
    exits while a peer still talks to it, which aborts gloo), then destroy the groups."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed: a peer died or did not answer in time."""
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(
        marker in text for marker in ("gloo", "nccl", "timed out", "connection closed"))


def describe_collective_failure(exc: BaseException, topo: Topology, timeout_s: float) -> str:
    """One line naming this rank, its coordinates and what its peers failed to do."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"rank {topo.rank} (tp {topo.tp_axis.rank}, pp {topo.pp_axis.rank}, dp "
            f"{topo.dp_axis.rank}): a collective with its peers failed (a peer died, or hung "
            f"longer than parallel.timeout_s={timeout_s:g}): {first}")
