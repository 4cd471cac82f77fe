"""Memory terms against Korthikanti et al. 2022 and the Megatron bytes-per-parameter table."""

from __future__ import annotations

import pytest

from megaloom.config import ModelConfig
from megaloom.plan.estimate import estimate
from megaloom.plan.gpus import GIB, get_gpu
from megaloom.plan.layout import Layout, PlanError
from megaloom.plan.memory import (
    activation_coefficients,
    inflight_layers,
    layer_activation_bytes,
    output_activation_bytes,
    recompute_working_bytes,
    stage_memory,
)
from megaloom.plan.params import parameters_per_gpu, stage_parameters

# s=32, b=2, h=64, a=4: sbh = 4096, 5as/h = 10.
GPT2 = ModelConfig(arch="gpt2", num_layers=4, hidden_size=64, num_heads=4, seq_len=32,
                   vocab_size=1000)
S, B = 32, 2
SBH = S * B * 64


def test_gpt2_coefficients_are_the_papers():
    coeffs = activation_coefficients(GPT2)
    assert (coeffs.replicated, coeffs.sharded) == (10, 24)


@pytest.mark.parametrize("tp,sp,recompute,expected", [
    (1, False, "none", SBH * (34 + 10)),  # sbh(34 + 5as/h)
    (2, False, "none", SBH * (10 + 24 / 2 + 10 / 2)),  # sbh(10 + 24/t + 5as/(ht))
    (4, True, "none", SBH / 4 * (34 + 10)),  # sbh/t (34 + 5as/h)
    (2, False, "selective", SBH * (10 + 24 / 2)),
    (4, True, "selective", SBH / 4 * 34),
    (2, False, "full", 2 * SBH),
    (4, True, "full", 2 * SBH / 4),
])
def test_layer_activations_follow_korthikanti(tp, sp, recompute, expected):
    assert layer_activation_bytes(GPT2, S, B, tp, sp, recompute) == pytest.approx(expected)


def test_swiglu_gqa_coefficients_hand_derived():
    # h=64, a=8, a_kv=2 (g=1/4), f=192 (3h): split = Q 2 + K,V 4g + proj 2 + SwiGLU 8f/h.
    llama = ModelConfig(arch="llama", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2,
                        ffn_hidden_size=192, seq_len=16)
    coeffs = activation_coefficients(llama)
    assert coeffs.sharded == pytest.approx(2 + 1 + 2 + 24)
    assert coeffs.replicated == 10
    sbh = 16 * 1 * 64
    scores = 5 * 8 * 16 / 64
    assert layer_activation_bytes(llama, 16, 1, 1, False, "none") == pytest.approx(
        sbh * (10 + 29 + scores))


def test_recompute_working_set():
    assert recompute_working_bytes(GPT2, S, B, 2, False, "none") == 0
    assert recompute_working_bytes(GPT2, S, B, 2, False, "selective") == pytest.approx(
        SBH * 10 / 2)  # the s x s scores of one layer, split over tp
    assert recompute_working_bytes(GPT2, S, B, 2, True, "full") == pytest.approx(
        SBH / 2 * 44)  # one whole layer, as without recomputation


def test_output_activations():
    vocab = GPT2.padded_vocab_size
    assert output_activation_bytes(GPT2, S, B, 2, False) == 4 * SBH + 4 * S * B * vocab / 2
    assert output_activation_bytes(GPT2, S, B, 2, True) == 4 * SBH / 2 + 4 * S * B * vocab / 2


@pytest.mark.parametrize("pp,vpp", [(2, 1), (4, 1), (4, 2), (3, 3), (8, 4)])
def test_first_stage_holds_p_microbatches_times_interleave_factor(pp, vpp):
    layers = pp * vpp * 2
    expected = layers * (1 + (pp - 1) / (pp * vpp)) if vpp > 1 else layers
    assert inflight_layers(layers, pp, vpp, num_micro_batches=64, stage=0) == pytest.approx(
        expected)


def test_inflight_later_stages_and_few_micro_batches():
    assert inflight_layers(8, 4, 1, 64, stage=3) == 2  # the last stage: one micro-batch
    assert inflight_layers(8, 4, 1, 64, stage=1) == 6  # p - 1 micro-batches of 2 layers
    assert inflight_layers(8, 4, 1, 2, stage=0) == 4  # only m = 2 micro-batches exist
    assert inflight_layers(8, 1, 1, 5, stage=0) == 8  # no pipeline: one micro-batch at a time


def plan_memory(**layout_kwargs):
    layout = Layout(**{"gpus": 8, "global_batch": 64, **layout_kwargs})
    return estimate(GPT2, layout, get_gpu("a100-80gb"), allowance_bytes=0)


@pytest.mark.parametrize("dist,grad,per_param", [
    (False, "fp32", 2 + 4 + 12),  # Megatron: 18 bytes per parameter
    (True, "fp32", 2 + 4 + 12 / 4),  # 6 + 12/d with the distributed optimizer
    (True, "bf16", 2 + 2 + 12 / 4),
])
def test_model_state_bytes_per_parameter(dist, grad, per_param):
    plan = plan_memory(tp=2, zero=int(dist), grad_dtype=grad)  # dp = 4
    mem = plan.memory[0]
    params = parameters_per_gpu(GPT2, stage_parameters(GPT2, 1)[0], 2)
    assert mem.params_per_gpu == params
    assert mem.weights + mem.gradients + mem.optimizer == pytest.approx(params * per_param)


# ZeRO (Rajbhandari et al. 2020) Table I: model-state GB per device of mixed-precision Adam
# (K = 12) for a model of Psi parameters over Nd data-parallel ranks, at stages 1, 2 and 3.
ZERO_TABLE_I = {  # Nd: {Psi in billions: (P_os, P_os+g, P_os+g+p)}
    1: {7.5: (120, 120, 120), 128: (2048, 2048, 2048), 1000: (16000, 16000, 16000)},
    4: {7.5: (52.5, 41.3, 30), 128: (896, 704, 512), 1000: (7000, 5500, 4000)},
    16: {7.5: (35.6, 21.6, 7.5), 128: (608, 368, 128), 1000: (4750, 2875, 1000)},
    64: {7.5: (31.4, 16.6, 1.88), 128: (536, 284, 32), 1000: (4187, 2218, 250)},
    256: {7.5: (30.4, 15.4, 0.47), 128: (518, 263, 8), 1000: (4046, 2054, 62.5)},
    1024: {7.5: (30.1, 15.1, 0.12), 128: (513, 257, 2), 1000: (4011, 2013, 15.6)},
}


@pytest.mark.parametrize("dp", sorted(ZERO_TABLE_I))
def test_zero_stages_reproduce_zero_table_one(dp):
    """Bytes per parameter from the planner (fp16 weights and gradients, as ZeRO) times Psi:
    the table's figures to within one unit of their last printed digit (the table rounds some
    figures and truncates others, e.g. 257.75 printed as 257)."""
    for zero in (1, 2, 3):
        mem = plan_memory(gpus=dp, global_batch=dp, zero=zero, precision="fp16",
                          grad_dtype="bf16").memory[0]
        per_param = (mem.weights + mem.gradients + mem.optimizer) / mem.params_per_gpu
        for psi, figures in ZERO_TABLE_I[dp].items():
            printed = figures[zero - 1]
            unit = 10.0 ** -len(str(printed).partition(".")[2]) if "." in str(printed) else 1
            assert abs(psi * per_param - printed) < unit, f"Nd={dp} Psi={psi}B stage {zero}"


def test_zero_zero_is_the_unsharded_baseline_and_stage_one_the_distributed_optimizer():
    base = plan_memory(precision="fp16", grad_dtype="bf16").memory[0]
    assert base.weights + base.gradients + base.optimizer == 16 * base.params_per_gpu
    assert (plan_memory(zero=1).memory[0].optimizer
            == base.optimizer / 8)  # dp = 8
    with pytest.raises(PlanError, match="--zero must be one of"):
        plan_memory(zero=4)


def test_fp32_training_keeps_four_byte_weights_and_gradients():
    mem = plan_memory(precision="fp32").memory[0]
    assert (mem.weights, mem.gradients, mem.optimizer) == tuple(
        mem.params_per_gpu * n for n in (4, 4, 8))
    with pytest.raises(PlanError, match="grad-dtype"):
        plan_memory(precision="fp32", grad_dtype="bf16")


def test_stage_totals_add_up_on_a_pipeline():
    # pp=2, m = 64 / (4 * 2) = 8: the first stage holds 2 micro-batches of 2 layers.
    plan = plan_memory(pp=2, micro_batch=4, recompute="selective", sequence_parallel=True,
                       tp=2)
    first, last = plan.memory
    sbh = S * 4 * 64
    assert first.activations == pytest.approx(2 * 2 * sbh / 2 * 34)
    assert last.activations == pytest.approx(1 * 2 * sbh / 2 * 34)
    assert first.output_activations == 0 and last.output_activations > 0
    assert plan.peak_memory_bytes == max(first.total, last.total)
    assert plan.fits


def test_verdict_does_not_fit():
    big = ModelConfig(arch="gpt2", num_layers=4, hidden_size=8192, num_heads=64, seq_len=2048)
    plan = estimate(big, Layout(gpus=1, global_batch=1, precision="fp16"), get_gpu("v100"))
    # ~3.3B parameters x 18 bytes > 32 GiB before any activation.
    assert plan.parameters * 18 > 32 * GIB
    assert not plan.fits


def test_uneven_stages_hold_their_own_layers():
    """5 layers on 2 stages split 3 + 2 (as the runtime does): the first stage keeps two
    micro-batches of 3 layers, the last one micro-batch of 2."""
    model = ModelConfig(arch="gpt2", num_layers=5, hidden_size=64, num_heads=4, seq_len=32,
                        vocab_size=128)
    layout = Layout(gpus=2, pp=2, micro_batch=1, global_batch=8).validate(model)
    per_layer = layer_activation_bytes(model, 32, 1, 1, False, "none")
    stages = stage_parameters(model, 2)
    assert [s.num_layers for s in stages] == [3, 2]
    first, last = (stage_memory(model, layout, s, 0.0) for s in stages)
    assert first.activations == pytest.approx(2 * 3 * per_layer)
    assert last.activations == pytest.approx(1 * 2 * per_layer)
