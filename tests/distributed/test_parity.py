"""Every (tp, pp, dp) layout with sizes in {1, 2}, with sequence parallelism, the
distributed optimizer and the interleaved pipeline schedule: 3 optimizer steps equal the
single-process run (losses, gradients, gradient norm, post-step weights), with uneven
loss-token counts across dp ranks."""

import pytest
import torch
from harness import spawn
from parity import assert_same_run, parallel_run, reference_run, tiny_model

from megaloom.parallel.topology import Topology

STEPS = 3

# (tp, pp, dp, arch, sequence_parallel, distributed_optimizer, virtual pipeline stages)
LAYOUTS = [
    (2, 1, 1, "llama", False, False, 1),
    (1, 2, 1, "gpt2", False, False, 1),
    (1, 1, 2, "llama", False, True, 1),
    (2, 2, 1, "gpt2", True, False, 1),
    (2, 1, 2, "gpt2", False, False, 1),
    (1, 2, 2, "llama", False, False, 1),
    (2, 1, 2, "llama", True, True, 1),
    (2, 2, 2, "gpt2", True, True, 1),
    (1, 2, 1, "gpt2", False, False, 2),
    (2, 2, 1, "llama", True, False, 2),
    (2, 1, 1, "bert", False, False, 1),
    (1, 1, 2, "bert", False, True, 1),
    (1, 2, 1, "bert", False, False, 1),
    (2, 2, 2, "bert-pre", True, True, 1),
    (2, 1, 1, "t5", False, False, 1),
    (1, 1, 2, "t5", False, True, 1),
    (2, 1, 2, "t5", True, True, 1),
]


def _layout_worker(rank, world, tp, pp, arch, sp, zero, vpp, out):
    topo = Topology.build(tp=tp, pp=pp)
    records, _, _ = parallel_run(tiny_model(arch), topo, STEPS, sp, zero, vpp)
    if rank == 0:
        torch.save(records, out)


def _name(tp, pp, dp, arch, sp, zero, vpp):
    flags = ("-sp" if sp else "") + ("-zero" if zero else "") + (f"-vpp{vpp}" if vpp > 1 else "")
    return f"tp{tp}-pp{pp}-dp{dp}-{arch}{flags}"


@pytest.mark.parametrize("tp,pp,dp,arch,sp,zero,vpp", LAYOUTS,
                         ids=[_name(*layout) for layout in LAYOUTS])
def test_layout_matches_single_process(tmp_path, tp, pp, dp, arch, sp, zero, vpp):
    out = tmp_path / "records.pt"
    spawn(_layout_worker, tp * pp * dp, tp, pp, arch, sp, zero, vpp, str(out))
    reference = reference_run(tiny_model(arch), STEPS)
    assert reference[0]["grad_norm"] > 0.05  # clipping is active
    assert_same_run(reference, torch.load(out, weights_only=False))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_world_size_one_needs_no_process_group(arch):
    records, _, _ = parallel_run(tiny_model(arch), Topology.build(), STEPS, False, True)
    assert_same_run(reference_run(tiny_model(arch), STEPS), records)
