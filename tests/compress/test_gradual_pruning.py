"""Gradual magnitude pruning in one process: Zhu & Gupta's cubic schedule in closed form,
masks against a sort of the magnitudes, pruned weights staying zero through training,
norms untouched, figures in metrics.jsonl, and the config's refusals."""

import math

import numpy as np
import pytest
import torch

from megaloom.compress.gradual import is_update_step, scheduled_sparsity
from megaloom.compress.masks import magnitude_mask, target_of
from megaloom.config import (
    Config,
    ConfigError,
    LoraConfig,
    ModelConfig,
    PruningConfig,
    TaskConfig,
    TrainConfig,
    load_config,
)
from megaloom.parallel.topology import Topology
from megaloom.train.metrics import read_metrics
from megaloom.train.trainer import Trainer

VOCAB, SEQ = 97, 16
DATA = [(np.random.default_rng(i).integers(0, VOCAB) + np.arange(SEQ + 1)) % VOCAB
        for i in range(100)]


def zhu_gupta(t, s_i, s_f, t0, n, dt):
    """Eq. 1 of Zhu & Gupta (2017), held between the pruning steps t0 + k dt."""
    if t < t0:
        return 0.0
    k = min((t - t0) // dt, n)
    return s_f + (s_i - s_f) * (1 - k * dt / (n * dt)) ** 3


def test_schedule_is_zhu_and_gupta():
    cfg = PruningConfig(sparsity=0.8, initial_sparsity=0.2, start_step=10, end_step=50,
                        interval=10)
    got = [scheduled_sparsity(t, cfg, 100) for t in range(0, 80)]
    assert got == pytest.approx([zhu_gupta(t, 0.2, 0.8, 10, 4, 10) for t in range(0, 80)])
    assert [t for t in range(80) if is_update_step(t, cfg, 100)] == [10, 20, 30, 40, 50]
    assert all(a <= b for a, b in zip(got, got[1:], strict=False))


def test_end_step_off_the_grid_is_an_update():
    cfg = PruningConfig(sparsity=0.5, start_step=0, end_step=7, interval=3)
    assert [t for t in range(10) if is_update_step(t, cfg, 10)] == [0, 3, 6, 7]
    assert scheduled_sparsity(7, cfg, 10) == 0.5


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_mask_keeps_the_largest_magnitudes(sparsity):
    weight = torch.nn.Parameter(torch.randn(24, 40, generator=torch.Generator().manual_seed(3)))
    mask = magnitude_mask(weight, sparsity, Topology.build().tp_axis)
    pruned = round(sparsity * weight.numel())
    order = weight.detach().abs().flatten().argsort()
    expected = torch.ones(weight.numel(), dtype=torch.bool)
    expected[order[:pruned]] = False
    assert torch.equal(mask.flatten(), expected)


def test_targets_are_projections_and_opt_in_embeddings():
    assert target_of("layers.3.attn.qkv.weight") == "qkv"
    assert target_of("layers.0.mlp.gate.weight") == "gate"
    assert target_of("embed.weight") == "embed"
    for never in ("layers.0.attn_norm.weight", "layers.0.attn.qkv.bias", "pos_embed.weight",
                  "final_norm.weight"):
        assert target_of(never) is None


def test_training_keeps_pruned_weights_at_zero(tmp_path):
    cfg = Config(
        model=ModelConfig(arch="llama", num_layers=2, hidden_size=32, num_heads=4,
                          num_kv_heads=2, vocab_size=VOCAB, make_vocab_size_divisible_by=1,
                          seq_len=SEQ),
        train=TrainConfig(out_dir=str(tmp_path), micro_batch_size=2, global_batch_size=4,
                          max_steps=9, warmup_steps=1, lr=3e-3, eval_interval=100,
                          save_interval=100,
                          pruning=PruningConfig(sparsity=0.7, start_step=2, end_step=6,
                                                interval=2)))
    trainer = Trainer.create(cfg, DATA, None)
    norms_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                    if "norm" in n}
    trainer.run()
    pruned = trainer.pruner.params
    assert sorted(k.split(".")[-2] for k in pruned) == sorted(
        ["qkv", "proj", "up", "gate", "down"] * 2)
    for key, param in pruned.items():
        zeros = int((param == 0).sum())
        assert zeros == round(0.7 * param.numel()), key
    for name, param in trainer.model.named_parameters():
        if "norm" in name:
            assert int((param == 0).sum()) == 0 and not torch.equal(param, norms_before[name])
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["sparsity_target"] for r in records] == pytest.approx(
        [0, 0.7 * (1 - (1 - 0 / 4) ** 3), 0.7 * (1 - (1 - 0 / 4) ** 3),
         0.7 * (1 - (1 - 2 / 4) ** 3), 0.7 * (1 - (1 - 2 / 4) ** 3), 0.7, 0.7, 0.7, 0.7])
    total = sum(p.numel() for p in pruned.values())
    assert records[-1]["sparsity"] == pytest.approx(
        sum(round(0.7 * p.numel()) for p in pruned.values()) / total)
    assert set(records[-1]["sparsity_layers"]) == {"0", "1"}
    assert math.isclose(records[-1]["sparsity_layers"]["0"], 0.7, abs_tol=1e-3)


BAD = [
    (["train.pruning.sparsity=1.0"], "train.pruning.sparsity"),
    (["train.pruning.sparsity=0.5", "train.pruning.initial_sparsity=0.6"],
     "train.pruning.initial_sparsity"),
    (["train.pruning.sparsity=0.5", "train.pruning.interval=0"], "train.pruning.interval"),
    (["train.pruning.sparsity=0.5", "train.pruning.start_step=50",
      "train.pruning.end_step=10"], "train.pruning.end_step"),
    (["train.pruning.targets=[attn_norm]"], "train.pruning.targets"),
    (["train.pruning.sparsity=nan"], "train.pruning"),
    (["train.pruning.bogus=1"], "bogus"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[b[1] for b in BAD])
def test_bad_pruning_config_names_the_key(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_config(None, overrides)


def test_pruning_and_lora_do_not_mix():
    config = Config(train=TrainConfig(pruning=PruningConfig(sparsity=0.5)),
                    task=TaskConfig(name="sft", lora=LoraConfig(rank=4)))
    with pytest.raises(ConfigError, match="LoRA"):
        config.validate()
