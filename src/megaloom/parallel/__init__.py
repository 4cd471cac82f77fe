"""Tensor, sequence, pipeline and data parallelism applied to the plain `GPT` from outside.

One short module per concern: `topology` (axes and groups), `mappings` (conjugate collectives),
`layers` (column/row/vocab-parallel), `loss` (vocab-parallel cross-entropy), `random` (dropout
RNG streams), `pipeline` (stage split and 1F1B), `data_parallel` (gradient reduction, clipping,
ZeRO-1), `parallelize` (applies them; full <-> sharded tensors) and `trainer` (torchrun
integration of the `Trainer`).
"""

from megaloom.parallel.data_parallel import ParallelOptimizer
from megaloom.parallel.parallelize import (
    gather_full_state_dict,
    parallelize,
)
from megaloom.parallel.pipeline import forward_backward, forward_only
from megaloom.parallel.topology import Topology, init_distributed

__all__ = [
    "ParallelOptimizer",
    "Topology",
    "forward_backward",
    "forward_only",
    "gather_full_state_dict",
    "init_distributed",
    "parallelize",
]
