"""The rules a parallel layout must satisfy, in one place: config validation, the runtime and
the planner (`megaloom plan`) all ask this module, so they give the same answers.

A layout is tp x pp (x vpp interleaved chunks per pipeline rank) x dp. Each tp rank holds whole
kv-head groups (`megaloom.model.gpt` lays out `qkv` per group), so tp divides the query heads,
the kv heads and the MLP width; sequence parallelism splits the sequence over tp. Pipeline
stages own contiguous, balanced blocks of layers, earlier blocks taking the remainder when the
count does not divide (`stage_layers`), so pp x vpp only has to be at most the layer count.
The global batch is a whole number of micro-batches per dp rank; the interleaved schedule needs
a multiple of pp of them. Torch-free, so the planner stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaloom.config import ModelConfig


@dataclass(frozen=True)
class LayoutSpec:
    """A layout and the batch it runs (None: not known yet, the rule is skipped)."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int | None = 1
    sequence_parallel: bool = False
    micro_batch: int | None = None
    global_batch: int | None = None
    activation_checkpointing: bool = False


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """Layers of block `stage` of `stages`: contiguous, balanced, earlier blocks taking the
    remainder."""
    if num_layers < stages:
        raise ValueError(f"model.num_layers={num_layers} is smaller than the {stages} "
                         "pipeline stages (parallel.pp x parallel.vpp)")
    base, extra = divmod(num_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def rank_layers(num_layers: int, pp: int, vpp: int, pp_rank: int) -> list[range]:
    """The layer blocks of pipeline rank `pp_rank`: with `vpp` chunks, chunk `c` is block
    `c * pp + pp_rank` of `pp * vpp` (interleaved); with vpp=1, its one stage."""
    return [stage_layers(num_layers, pp * vpp, c * pp + pp_rank) for c in range(vpp)]


def layout_problems(model: ModelConfig, spec: LayoutSpec) -> list[tuple[str, str]]:
    """(config key, message naming it) for every rule `spec` breaks with `model`; empty when
    it fits."""
    tp, pp, vpp = spec.tp, spec.pp, spec.vpp
    problems = [(key, f"{key} must be >= 1, got {value}")
                for key, value in (("parallel.tp", tp), ("parallel.pp", pp),
                                   ("parallel.vpp", vpp)) if value < 1]
    if problems:
        return problems
    if vpp > 1 and pp == 1:
        problems.append(("parallel.vpp", "parallel.vpp > 1 (interleaved virtual stages) needs "
                         "parallel.pp > 1"))
    for key in ("num_heads", "num_kv_heads", "ffn_hidden_size"):
        if getattr(model, key) % tp:
            problems.append((f"model.{key}", f"model.{key}={getattr(model, key)} is not "
                             f"divisible by parallel.tp={tp}"))
    if spec.sequence_parallel and model.seq_len % tp:
        problems.append(("model.seq_len", f"model.seq_len={model.seq_len} is not divisible by "
                         f"parallel.tp={tp} (sequence parallelism)"))
    pooled = model.binary_head or (model.arch == "bert" and model.num_labels)
    if spec.sequence_parallel and tp > 1 and pooled:
        problems.append(("parallel.sequence_parallel", "parallel.sequence_parallel is not "
                         "supported with a pooled head (BERT's classifier or model.binary_head:"
                         " the first token lives on one sequence shard); turn it off"))
    if model.arch == "t5" and pp > 1:
        problems.append(("parallel.pp", "parallel.pp > 1 is not supported for model.arch=t5 "
                         "(its decoder needs the encoder output on every stage); split it "
                         "with parallel.tp and data parallelism"))
    if model.num_layers < pp * vpp:
        problems.append(("model.num_layers", f"model.num_layers={model.num_layers} is smaller "
                         f"than parallel.pp x parallel.vpp = {pp} x {vpp}"))
    if model.dropout > 0 and tp > 1 and spec.activation_checkpointing:
        problems.append(("train.activation_checkpointing", "train.activation_checkpointing with "
                         "model.dropout > 0 and parallel.tp > 1 is not supported (recomputed "
                         "dropout would draw other masks from the tensor-parallel RNG stream)"))
    if spec.dp is not None and spec.micro_batch and spec.global_batch:
        per_rank = spec.micro_batch * spec.dp
        if spec.global_batch % per_rank:
            problems.append(("train.global_batch_size", f"train.global_batch_size="
                             f"{spec.global_batch} is not a multiple of train.micro_batch_size "
                             f"x dp = {spec.micro_batch} x {spec.dp}"))
        elif vpp > 1 and (spec.global_batch // per_rank) % pp:
            problems.append(("parallel.vpp", f"parallel.vpp={vpp}: the micro-batches per step "
                             f"and dp rank ({spec.global_batch // per_rank}) must be a multiple "
                             f"of parallel.pp={pp}"))
    return problems


def launch_problem(config, world: int) -> str | None:
    """Why a `Config` cannot run on `world` processes (checked before torchrun starts them, so
    the user reads one line instead of one traceback per rank); None when it can."""
    par, train = config.parallel, config.train
    if world % (par.tp * par.pp):
        return (f"--nproc {world} is not a multiple of parallel.tp x parallel.pp = "
                f"{par.tp} x {par.pp}")
    spec = LayoutSpec(tp=par.tp, pp=par.pp, vpp=par.vpp, dp=world // (par.tp * par.pp),
                      sequence_parallel=par.sequence_parallel,
                      micro_batch=train.micro_batch_size, global_batch=train.global_batch_size,
                      activation_checkpointing=train.activation_checkpointing)
    problems = layout_problems(config.model, spec)
    return problems[0][1] if problems else None
