"""The planner's per-rank model state equals what each rank of a layout really holds.

Shapes are counted on `meta` (a virtual topology, no processes), so any rank of any size of
model is checked without memory, up to MT-NLG 530B at tp 8 x pp 35; optimizer bytes are
counted after a real step on gloo ranks (AdamW allocates its state lazily)."""

import math

import pytest
import torch
from harness import spawn

from megaloom.config import Config, ModelConfig, ParallelConfig, TrainConfig
from megaloom.model.presets import preset_config
from megaloom.parallel.build import InitSource, build_shard
from megaloom.parallel.topology import Topology
from megaloom.plan.layout import Layout
from megaloom.plan.memory import stage_memory
from megaloom.plan.params import parameters_per_gpu, stage_parameters
from megaloom.train.trainer import Trainer

GPT2 = ModelConfig(arch="gpt2", num_layers=5, hidden_size=32, num_heads=4, seq_len=8,
                   vocab_size=61, make_vocab_size_divisible_by=1)
LLAMA = ModelConfig(arch="llama", num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2,
                    ffn_hidden_size=64, seq_len=8, vocab_size=61, make_vocab_size_divisible_by=1)

BERT_SOP = ModelConfig(arch="bert", num_layers=4, hidden_size=32, num_heads=4, seq_len=8,
                       vocab_size=61, make_vocab_size_divisible_by=1, binary_head=True)
BERT_PRE_CLASSIFIER = ModelConfig(arch="bert", num_layers=6, hidden_size=32, num_heads=4,
                                  seq_len=8, vocab_size=61, norm_position="pre", num_labels=3)
T5_UNTIED = ModelConfig(arch="t5", num_layers=3, decoder_layers=2, hidden_size=32, num_heads=4,
                       seq_len=8, vocab_size=61, activation="geglu", tie_embeddings=False)
T5_TIED = ModelConfig(arch="t5", num_layers=2, hidden_size=32, num_heads=4, seq_len=8,
                      vocab_size=61, make_vocab_size_divisible_by=1)


def meta_rank(config: ModelConfig, tp: int, pp: int, rank: int, vpp: int = 1):
    topo = Topology.build(tp, pp, "meta", virtual=(tp * pp, rank))
    model = build_shard(config, topo, InitSource(config, 0), vpp=vpp)
    return topo, model


def distinct_numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


SHAPES = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2), (1, 3, 1), (2, 2, 2)]


@pytest.mark.parametrize("config,tp,pp,vpp", [(GPT2, 4, 1, 1), (T5_UNTIED, 2, 1, 1),
                                             (T5_UNTIED, 4, 1, 1), (T5_TIED, 2, 1, 1)]
                         + [(c, *shape) for c in (GPT2, LLAMA, BERT_SOP, BERT_PRE_CLASSIFIER)
                            for shape in SHAPES])
def test_every_rank_holds_the_planned_parameters(config, tp, pp, vpp):
    stages = stage_parameters(config, pp, vpp)
    for rank in range(tp * pp):
        topo, model = meta_rank(config, tp, pp, rank, vpp)
        assert distinct_numel(model) == parameters_per_gpu(config, stages[topo.pp_axis.rank],
                                                           tp), f"rank {rank}"


def test_mt_nlg_530b_rank_builds_only_its_share():
    config = preset_config("mt-nlg-530b")
    topo, model = meta_rank(config, 8, 35, 0)
    params = distinct_numel(model)
    stage = stage_parameters(config, 35)[0]
    assert params == parameters_per_gpu(config, stage, 8)
    assert len(model.layers) == 3 and model.embed is not None and model.lm_head is None
    total = sum(s.total for s in stage_parameters(config, 35))
    assert params < total / 200  # 1/280 of the model plus its replicated norms
    assert all(p.device.type == "meta" for p in model.parameters())


LAYOUTS = [  # tp, pp, vpp, distributed optimizer, world
    (2, 2, 1, False, 4), (1, 2, 2, False, 2), (2, 1, 1, True, 4), (1, 2, 1, True, 4)]


def _count_rank(rank, world, tp, pp, vpp, zero, config, results):
    cfg = Config(model=config,
                 train=TrainConfig(micro_batch_size=1, global_batch_size=4, precision="fp32",
                                   warmup_steps=0),
                 parallel=ParallelConfig(tp=tp, pp=pp, vpp=vpp, distributed_optimizer=zero))
    data = [torch.arange(9).numpy() % 61 for _ in range(8)]
    trainer = Trainer.create(cfg, data, None)
    trainer.train_step()
    optimizer = trainer.optimizer
    moments = sum(t.numel() * t.element_size() for state in optimizer.optimizer.state.values()
                  for k, t in state.items() if k != "step")
    # ZeRO's one extra buffer: the reduce-scattered gradient of the rank's slice (the slice
    # itself is a view of the parameters)
    shards = sum(s.shard.grad.numel() * 4 for s in optimizer.shards)
    layout = Layout(gpus=world, tp=tp, pp=pp, vpp=vpp, micro_batch=1, global_batch=4,
                    precision="fp32", zero=int(zero)).validate(config)
    plan = stage_memory(config, layout, stage_parameters(config, pp, vpp)[trainer.topo.pp_axis
                                                                           .rank], 0.0)
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainer.model.parameters())
    torch.save({"weights": (weights, plan.weights), "gradients": (grads, plan.gradients),
                "optimizer": (moments + shards, plan.optimizer),
                "groups": len(optimizer.optimizer.param_groups), "dp": trainer.topo.dp},
               f"{results}/{rank}.pt")


@pytest.mark.parametrize("tp,pp,vpp,zero,world", LAYOUTS)
def test_planned_bytes_equal_the_allocated_bytes(tmp_path, tp, pp, vpp, zero, world):
    spawn(_count_rank, world, tp, pp, vpp, zero, LLAMA, str(tmp_path))
    for rank in range(world):
        counts = torch.load(tmp_path / f"{rank}.pt")
        for kind in ("weights", "gradients"):
            real, planned = counts[kind]
            assert real == planned, f"rank {rank} {kind}: {real} allocated, {planned} planned"
        real, planned = counts["optimizer"]
        # ZeRO pads each group's flat buffer to a multiple of dp: < dp elements of 12 bytes
        slack = 12 * counts["groups"] * (counts["dp"] - 1) / counts["dp"] if zero else 0
        assert math.isclose(real, planned, abs_tol=slack), f"rank {rank}: {real} vs {planned}"
