"""Search invariants: every proposal is a valid, fitting layout; none is missed; fastest first."""

from __future__ import annotations

import itertools

import pytest

from megaloom.config import ModelConfig
from megaloom.model import preset_config
from megaloom.plan import Layout, PlanError, estimate, get_gpu, search

CASES = [
    ("gpt2-1.5b", "a100-40gb", 16, 64),
    ("megatron-8.3b", "v100", 64, 512),
    ("tiny-llama", "h100-sxm", 8, 32),
]


def brute_force(model, gpu, gpus, global_batch, gpus_per_node=8):
    """Every combination of sizes, kept when the layout is valid and fits."""
    found = set()
    for tp, pp, micro, recompute in itertools.product(
            range(1, gpus + 1), range(1, model.num_layers + 1),
            [2**k for k in range(global_batch.bit_length())], ("none", "selective", "full")):
        if gpus % (tp * pp) or model.num_layers % pp:  # the search proposes balanced stages
            continue
        layout = Layout(gpus=gpus, tp=tp, pp=pp, micro_batch=micro, global_batch=global_batch,
                        recompute=recompute, sequence_parallel=tp > 1,
                        precision="fp16" if gpu.name == "V100" else "bf16")
        try:
            plan = estimate(model, layout, gpu, gpus_per_node=gpus_per_node)
        except PlanError:
            continue
        if plan.fits:
            found.add((tp, pp, micro, recompute))
    return found


@pytest.mark.parametrize("preset,gpu_name,gpus,global_batch", CASES)
def test_search_proposes_exactly_the_valid_fitting_layouts(preset, gpu_name, gpus, global_batch):
    model = preset_config(preset)
    gpu = get_gpu(gpu_name)
    precision = "fp16" if gpu_name == "v100" else "bf16"
    base = Layout(gpus=gpus, global_batch=global_batch, precision=precision)
    plans = search(model, base, gpu)
    assert plans, "expected at least one fitting layout"
    for plan in plans:
        lay = plan.layout
        assert lay.tp * lay.pp * lay.dp == gpus
        assert lay.tp <= 8 and model.num_heads % lay.tp == 0 and model.num_layers % lay.pp == 0
        assert lay.global_batch % (lay.micro_batch * lay.dp) == 0
        assert plan.fits and plan.peak_memory_bytes <= gpu.memory_bytes
    times = [p.seconds_per_iteration for p in plans]
    # fastest first (ties within 6 significant digits are ordered by the tie-breakers)
    assert all(a <= b * (1 + 1e-5) for a, b in zip(times, times[1:], strict=False))
    proposed = {(p.layout.tp, p.layout.pp, p.layout.micro_batch, p.layout.recompute)
                for p in plans}
    assert proposed == brute_force(model, gpu, gpus, global_batch)


def test_search_top_and_nothing_fits():
    model = preset_config("gpt3-175b")
    base = Layout(gpus=8, global_batch=8, precision="fp16")
    assert search(model, base, get_gpu("v100")) == []
    small = search(preset_config("tiny"), Layout(gpus=4, global_batch=8), get_gpu("h200"), top=3)
    assert len(small) == 3


def test_search_keeps_tp_within_a_node():
    model = ModelConfig(arch="gpt2", num_layers=2, hidden_size=64, num_heads=16, seq_len=32,
                        vocab_size=256)
    plans = search(model, Layout(gpus=16, global_batch=16), get_gpu("a100-80gb"),
                   gpus_per_node=4, top=0)
    assert {p.layout.tp for p in plans} == {1, 2, 4}
