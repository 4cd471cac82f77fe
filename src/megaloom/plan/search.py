"""`--search`: every (tp, pp, dp, micro-batch, recompute) layout that fits, fastest first.

Enumeration rules: tp divides the GPUs of a node (tp never spans nodes) and the heads,
kv heads and MLP width; pp divides the number of layers (the search proposes balanced stages;
uneven ones are valid, see `megaloom.layout_rules`); dp = GPUs / (tp pp);
the micro-batch is a power of two dividing global batch / dp; recompute is none, selective
or full. Sequence parallelism is switched on whenever tp > 1 (it only saves memory);
precision, gradient dtype, distributed optimizer and vpp come from the base layout (a vpp
that does not fit a candidate's pipeline falls back to 1).

Ranking: estimated seconds per iteration (recomputation and the pipeline bubble cost time,
see `estimate`); ties, which the model cannot separate, go to fewer model-parallel GPUs
(less communication), then larger micro-batches (better kernel efficiency), then less memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from megaloom.config import ModelConfig
from megaloom.plan.estimate import Plan, estimate
from megaloom.plan.gpus import GPUSpec
from megaloom.plan.layout import RECOMPUTE_CHOICES, Layout, PlanError


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two_dividing(n: int) -> list[int]:
    return [2**k for k in range(n.bit_length()) if n % 2**k == 0]


def candidate_layouts(model: ModelConfig, base: Layout, gpus_per_node: int) -> Iterator[Layout]:
    """Every valid layout of `base.gpus` GPUs and `base.global_batch` under the rules above."""
    for tp in _divisors(min(gpus_per_node, base.gpus)):
        for pp in _divisors(model.num_layers):
            if base.gpus % (tp * pp):
                continue
            dp = base.gpus // (tp * pp)
            if base.global_batch % dp:
                continue
            for micro in _powers_of_two_dividing(base.global_batch // dp):
                for recompute in RECOMPUTE_CHOICES:
                    layout = replace(base, tp=tp, pp=pp, micro_batch=micro, recompute=recompute,
                                     sequence_parallel=tp > 1)
                    for vpp in dict.fromkeys((base.vpp if pp > 1 else 1, 1)):
                        try:
                            yield replace(layout, vpp=vpp).validate(model, gpus_per_node)
                            break
                        except PlanError:
                            continue


def _rank(plan: Plan) -> tuple:
    """Time (to 6 significant digits), then fewer model-parallel GPUs, larger micro-batches,
    less memory."""
    lay = plan.layout
    return (float(f"{plan.seconds_per_iteration:.6g}"), lay.tp * lay.pp, -lay.micro_batch,
            plan.peak_memory_bytes)


def search(model: ModelConfig, base: Layout, gpu: GPUSpec, *, gpus_per_node: int = 8,
           top: int | None = None, **options) -> list[Plan]:
    """Plans of every fitting layout of `base.gpus` GPUs, fastest first (`top` of them when
    given); `options` (rate, tokens, allowance, HFU convention) are passed to `estimate`."""
    plans = []
    for layout in candidate_layouts(model, base, gpus_per_node):
        plan = estimate(model, layout, gpu, gpus_per_node=gpus_per_node, **options)
        if plan.fits:
            plans.append(plan)
    plans.sort(key=_rank)
    return plans[:top] if top else plans
