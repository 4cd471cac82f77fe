"""Closed-form parameter counts against the real model built on the meta device."""

from __future__ import annotations

import pytest
import torch

from megaloom.config import ModelConfig
from megaloom.model import GPT, PRESETS, preset_config
from megaloom.model.registry import build_model
from megaloom.plan.layout import Layout, PlanError
from megaloom.plan.params import (
    count_parameters,
    gpt2_closed_form,
    parameters_per_gpu,
    stage_parameters,
)

LLAMA_VARIANTS = {
    "gqa-untied": dict(arch="llama", num_layers=3, hidden_size=64, num_heads=8, num_kv_heads=2,
                       vocab_size=1000),
    "mqa-tied": dict(arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=1,
                     vocab_size=300, tie_embeddings=True),
    "gqa-bias-layernorm": dict(arch="llama", num_layers=2, hidden_size=32, num_heads=4,
                               num_kv_heads=2, vocab_size=500, bias=True, norm="layernorm"),
    "rmsnorm-bias-ffn": dict(arch="llama", num_layers=2, hidden_size=48, num_heads=6,
                             num_kv_heads=3, ffn_hidden_size=100, bias=True, vocab_size=77),
    "gpt2-no-bias-gelu": dict(arch="gpt2", num_layers=2, hidden_size=32, num_heads=2,
                              bias=False, activation="gelu", vocab_size=999),
    "bert-post-sop": dict(arch="bert", num_layers=2, hidden_size=32, num_heads=4,
                          vocab_size=101, binary_head=True),
    "bert-pre-untied": dict(arch="bert", num_layers=2, hidden_size=32, num_heads=4,
                            vocab_size=77, norm_position="pre", tie_embeddings=False,
                            type_vocab_size=3),
    "bert-classifier": dict(arch="bert", num_layers=2, hidden_size=32, num_heads=2,
                            vocab_size=50, num_labels=3),
    "t5-v1.0": dict(arch="t5", num_layers=2, hidden_size=32, num_heads=4, vocab_size=101),
    "t5-v1.1-untied": dict(arch="t5", num_layers=3, decoder_layers=2, hidden_size=32,
                           num_heads=2, head_dim=24, activation="geglu", tie_embeddings=False,
                           relative_buckets=8, vocab_size=77),
    "gpt2-rope-untied": dict(arch="gpt2", num_layers=2, hidden_size=32, num_heads=4,
                             position_embedding="rope", tie_embeddings=False, vocab_size=130),
}


def meta_model(config: ModelConfig) -> GPT:
    with torch.device("meta"):
        return build_model(config)


def distinct_numel(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_meta_model(name):
    config = preset_config(name)
    assert count_parameters(config) == meta_model(config).num_parameters()


@pytest.mark.parametrize("name", list(LLAMA_VARIANTS))
def test_variants_match_meta_model(name):
    config = ModelConfig(**LLAMA_VARIANTS[name])
    assert count_parameters(config) == meta_model(config).num_parameters()


@pytest.mark.parametrize("name", ["gpt2-124m", "gpt3-175b", "mt-nlg-530b"])
def test_gpt2_closed_form_is_the_count_without_the_final_norm(name):
    config = preset_config(name)
    closed = gpt2_closed_form(config.num_layers, config.hidden_size, config.padded_vocab_size,
                              config.seq_len)
    assert count_parameters(config) == closed + 2 * config.hidden_size
    L, h, v, s = config.num_layers, config.hidden_size, config.padded_vocab_size, config.seq_len
    paper = 12 * L * h**2 * (1 + 13 / (12 * h) + (v + s) / (12 * L * h))
    assert closed == pytest.approx(paper, rel=1e-12)


def stage_reference(model: GPT, stage: int, pp: int) -> int:
    """Distinct parameters a pipeline stage keeps, read off the real module tree."""
    config = model.config
    per_stage = config.num_layers // pp
    params = []
    if stage == 0:
        params += list(model.embed.parameters())
        if model.pos_embed is not None:
            params += list(model.pos_embed.parameters())
    for index in range(stage * per_stage, (stage + 1) * per_stage):
        params += list(model.layers[str(index)].parameters())
    total = distinct_numel(params)
    if stage == pp - 1:
        total += distinct_numel(model.final_norm.parameters())
        if not (config.tie_embeddings and stage == 0):
            total += model.lm_head.weight.numel()  # a tied head is a copy on the last stage
    return total


@pytest.mark.parametrize("name,pp", [("tiny", 1), ("tiny", 2), ("tiny", 4), ("tiny-llama", 2),
                                     ("gqa-untied", 3), ("mqa-tied", 2)])
def test_stages_match_meta_model(name, pp):
    config = preset_config(name) if name in PRESETS else ModelConfig(**LLAMA_VARIANTS[name])
    model = meta_model(config)
    stages = stage_parameters(config, pp)
    assert [s.total for s in stages] == [stage_reference(model, i, pp) for i in range(pp)]
    copy = config.padded_vocab_size * config.hidden_size if config.tie_embeddings and pp > 1 else 0
    assert sum(s.total for s in stages) == model.num_parameters() + copy


@pytest.mark.parametrize("name,tp,pp", [("tiny", 2, 2), ("tiny", 4, 1), ("tiny-llama", 2, 2),
                                        ("gqa-untied", 2, 3)])
def test_tensor_parallel_shards_sum_to_stage_plus_replicas(name, tp, pp):
    """tp ranks together hold the stage once plus tp - 1 extra copies of what is replicated:
    norms, row-parallel biases (attn.proj, mlp.down) and position embeddings."""
    config = preset_config(name) if name in PRESETS else ModelConfig(**LLAMA_VARIANTS[name])
    Layout(gpus=tp * pp, tp=tp, pp=pp).validate(config)
    model = meta_model(config)
    replicated_names = ("norm.", "attn.proj.bias", "mlp.down.bias", "pos_embed.")
    for stage in stage_parameters(config, pp):
        first_layer = stage.stage * stage.num_layers
        owned = [f"layers.{i}." for i in range(first_layer, first_layer + stage.num_layers)]
        if stage.stage == 0:
            owned.append("pos_embed.")
        if stage.stage == pp - 1:
            owned.append("final_norm.")
        replicated = sum(p.numel() for n, p in model.named_parameters()
                         if any(n.startswith(o) for o in owned)
                         and any(r in n for r in replicated_names))
        per_gpu = parameters_per_gpu(config, stage, tp)
        assert per_gpu * tp == stage.total + (tp - 1) * replicated


def test_tp_must_divide_kv_heads():
    config = ModelConfig(**LLAMA_VARIANTS["gqa-untied"])  # 8 heads, 2 kv heads
    with pytest.raises(PlanError, match="num_kv_heads=2"):
        Layout(gpus=4, tp=4).validate(config)
