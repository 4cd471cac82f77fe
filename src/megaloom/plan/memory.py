"""Memory per GPU: weights, gradients, optimizer state and activations, in bytes.

Model state (mixed-precision Adam, as Megatron keeps it): 16-bit weights (2 bytes) plus
12 bytes of optimizer state per parameter (fp32 main weights 4, Adam m and v 8); gradients in
`grad_dtype` (Megatron accumulates in fp32 by default). Plain fp32 training keeps 4-byte
weights and gradients and 8 bytes of Adam state. ZeRO stage 1 (the distributed optimizer)
shards the optimizer state over dp, stage 2 also the gradients, stage 3 also the weights:
with 2-byte gradients this is ZeRO's Table I, (2 + 2 + 12) Psi / Nd at stage 3.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"), 16-bit activations and 1-byte dropout masks, per layer and micro-batch
of b sequences of length s, hidden h, a query heads, t tensor-parallel ranks:

    no parallelism       sbh (34 + 5as/h)
    tensor parallel      sbh (10 + 24/t + 5as/(ht))
    tensor + sequence    sbh/t (34 + 5as/h)
    selective recompute  drops the 5as/h term (scores, softmax, its dropout are recomputed)
    full recompute       keeps only each layer's input: 2sbh (2sbh/t with sequence parallel)

The constants 10 (kept whole on every tp rank: the two norm inputs 4, the qkv and MLP inputs
2 + 2, two dropout masks 1 + 1) and 24 (split over tp) are derived for a GPT-2 layer; this
module derives them from the config so GQA and SwiGLU are covered:

    split part = Q 2 + K 2g + V 2g + projection input 2 + MLP        with g = a_kv / a
    MLP        = 4f/h (GELU: its input and output, 2 bytes each, f wide)
               = 8f/h (SwiGLU: gate output, its SiLU, up output and their product)

which gives 8 + 16 = 24 for GPT-2 (g = 1, f = 4h). Dropout masks are counted as in the paper
even when dropout is 0, and the s^2 scores are counted although fused (flash) attention does
not store them: an upper bound, like the paper's. RoPE tables are negligible and ignored.

Pipeline: stage i of p holds the activations of the micro-batches it has started but not
finished. Under 1F1B that is min(p - i, m) micro-batches of the stage's L/p layers (its own
count when p does not divide L; p micro-batches on the first stage, so L layers' worth);
interleaved with v chunks, 2(p - i - 1) + (v - 1)p + 1 chunks of L/(pv) layers (Megatron's
warm-up count), i.e. L (1 + (p - 1)/(pv)) on the first stage. The last stage also holds the
head's inputs 4sbh (/t with sequence parallel) and fp32 logits for the loss, 4sbV/t. With
recomputation, one layer's recomputed activations are live during its backward pass and are
added as a working set. The embedding's 1-byte dropout mask is ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megaloom.config import GATED_ACTIVATIONS, ModelConfig
from megaloom.plan.layout import Layout
from megaloom.plan.params import StageParams, parameters_per_gpu

BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ActivationCoefficients:
    """Bytes per s*b*h of one layer's activations: kept whole on every tp rank, or split."""

    replicated: float
    sharded: float


def activation_coefficients(model: ModelConfig) -> ActivationCoefficients:
    kv_ratio = model.num_kv_heads / model.num_heads
    mlp_width = model.ffn_hidden_size / model.hidden_size
    mlp = (8 if model.activation in GATED_ACTIVATIONS else 4) * mlp_width
    return ActivationCoefficients(replicated=10.0, sharded=4 + 4 * kv_ratio + mlp)


def attention_score_coefficient(model: ModelConfig, seq_len: int) -> float:
    """5as/h: the softmax input/output and dropout of the s x s scores, per s*b*h."""
    return 5 * model.num_heads * seq_len / model.hidden_size


def layer_activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int, tp: int,
                           sequence_parallel: bool, recompute: str) -> float:
    """Bytes one layer keeps for one micro-batch on one GPU until its backward pass."""
    sbh = seq_len * micro_batch * model.hidden_size
    if recompute == "full":
        return 2 * sbh / (tp if sequence_parallel else 1)
    coeffs = activation_coefficients(model)
    scores = 0.0 if recompute == "selective" else attention_score_coefficient(model, seq_len)
    if sequence_parallel:
        return sbh * (coeffs.replicated + coeffs.sharded + scores) / tp
    return sbh * (coeffs.replicated + (coeffs.sharded + scores) / tp)


def recompute_working_bytes(model: ModelConfig, seq_len: int, micro_batch: int, tp: int,
                            sequence_parallel: bool, recompute: str) -> float:
    """Activations rebuilt for one layer during its backward pass (0 without recomputation)."""
    if recompute == "none":
        return 0.0
    if recompute == "selective":
        sbh = seq_len * micro_batch * model.hidden_size
        return sbh * attention_score_coefficient(model, seq_len) / tp
    return layer_activation_bytes(model, seq_len, micro_batch, tp, sequence_parallel, "none")


def inflight_layers(num_layers: int, pp: int, vpp: int, num_micro_batches: int,
                    stage: int, stage_layers: int | None = None) -> float:
    """Layers' worth of one micro-batch's activations that pipeline `stage` holds at its peak
    (`stage_layers`: the stage's own layer count when the split is uneven)."""
    if vpp == 1:
        per_stage = num_layers / pp if stage_layers is None else stage_layers
        return min(pp - stage, num_micro_batches) * per_stage
    chunks = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, num_micro_batches * vpp)
    return chunks * num_layers / (pp * vpp)


def output_activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int, tp: int,
                            sequence_parallel: bool) -> float:
    """Last stage: final-norm and head inputs (2 bytes each) and fp32 logits for the loss."""
    sb = seq_len * micro_batch
    hidden = 4 * sb * model.hidden_size / (tp if sequence_parallel else 1)
    return hidden + 4 * sb * model.padded_vocab_size / tp


# The ZeRO stage from which each kind of model state is partitioned over dp (Rajbhandari et
# al. 2020: 1 the optimizer state, 2 also the gradients, 3 also the weights).
ZERO_PARTITIONS = {"optimizer": 1, "gradients": 2, "weights": 3}


def model_state_bytes_per_param(precision: str, grad_dtype: str, zero: int = 0) -> dict[str, int]:
    """Bytes per parameter of weights, gradients and optimizer state (before dp sharding).

    fp32 is megaloom's own path: the Adam moments (8), and with the distributed optimizer
    (stage 1) also the reduce-scattered gradient of the rank's slice (4 more, then / dp; the
    slice itself is a view of the weights). From stage 2 that slice is the gradient itself."""
    if precision == "fp32":
        return {"weights": 4, "gradients": 4, "optimizer": 12 if zero == 1 else 8}
    return {"weights": BYTES_PER_PARAM[precision], "gradients": BYTES_PER_PARAM[grad_dtype],
            "optimizer": 12}


def zero_shards(kind: str, zero: int, dp: int) -> int:
    """How many dp ranks share one copy of `kind` ("weights", "gradients", "optimizer")."""
    return dp if zero >= ZERO_PARTITIONS[kind] else 1


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of a pipeline stage, by kind."""

    stage: int
    params_per_gpu: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    recompute_working: float
    output_activations: float
    allowance: float

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations
                + self.recompute_working + self.output_activations + self.allowance)

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def stage_memory(model: ModelConfig, layout: Layout, stage: StageParams,
                 allowance_bytes: float) -> StageMemory:
    """Peak bytes on one GPU of `stage` (model state, activations, fixed allowance)."""
    params = parameters_per_gpu(model, stage, layout.tp)
    state = {kind: per_param / zero_shards(kind, layout.zero, layout.dp) for kind, per_param
             in model_state_bytes_per_param(layout.precision, layout.grad_dtype,
                                            layout.zero).items()}
    args = (model, model.seq_len, layout.micro_batch, layout.tp, layout.sequence_parallel)
    decoder = model.decoder_layers or 0  # T5's decoder runs on its one stage
    layers = inflight_layers(model.num_blocks, layout.pp, layout.vpp,
                             layout.num_micro_batches, stage.stage, stage.num_layers + decoder)
    last = stage.stage == layout.pp - 1
    return StageMemory(
        stage=stage.stage,
        params_per_gpu=params,
        weights=params * state["weights"],
        gradients=params * state["gradients"],
        optimizer=params * state["optimizer"],
        activations=layers * layer_activation_bytes(*args, layout.recompute),
        recompute_working=recompute_working_bytes(*args, layout.recompute),
        output_activations=output_activation_bytes(*args) if last else 0.0,
        allowance=allowance_bytes,
    )
