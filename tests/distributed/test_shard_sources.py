"""Each rank builds its shard straight from a source, reading only what it owns: a sharded
megaloom checkpoint saved under another layout, or a Hugging Face directory (converted one
parameter at a time). The shards equal slices of the single-process model."""

import sys
from pathlib import Path

import numpy as np
import torch
from harness import spawn

sys.path.append(str(Path(__file__).parents[1] / "interop"))
from hf_reference import hf_model  # noqa: E402

from megaloom.config import Config, ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from megaloom.interop.weight_files import LazySafetensors  # noqa: E402
from megaloom.loading import load_model, open_weights  # noqa: E402
from megaloom.parallel.build import build_shard  # noqa: E402
from megaloom.parallel.parallelize import gather_full_state_dict  # noqa: E402
from megaloom.parallel.topology import Topology  # noqa: E402
from megaloom.train.trainer import Trainer  # noqa: E402


def _build(rank, world, spec, tp, pp, out, reads):
    config, _, source = open_weights(spec)
    if reads:
        original = LazySafetensors.__getitem__
        counted = []
        LazySafetensors.__getitem__ = lambda self, name: (counted.append(name),
                                                          original(self, name))[1]
    model = build_shard(config.model, Topology.build(tp, pp), source)
    full = gather_full_state_dict(model, Topology.build(tp, pp))
    if rank == 0:
        torch.save(full, out)
    if reads:
        # the tied head reads the embedding again; everything else is read once
        assert len(counted) <= len(set(counted)) + 1, counted


def test_tp_pp_ranks_built_from_a_sharded_checkpoint_equal_the_saved_model(tmp_path):
    cfg = Config(model=ModelConfig(arch="gpt2", num_layers=4, hidden_size=32, num_heads=4,
                                   vocab_size=61, make_vocab_size_divisible_by=1, seq_len=8),
                 train=TrainConfig(out_dir=str(tmp_path / "run"), micro_batch_size=2,
                                   global_batch_size=4),
                 parallel=ParallelConfig(tp=2, pp=2))
    spawn(_train_and_save, 4, cfg)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step_00000001").glob(
        "shard_*"))
    assert saved == [f"shard_0000{r}.safetensors" for r in range(4)]  # every rank wrote its own
    spawn(_build, 2, str(tmp_path / "run"), 2, 1, str(tmp_path / "tp2.pt"), False)
    reference, _, _ = load_model(tmp_path / "run")
    rebuilt = torch.load(tmp_path / "tp2.pt")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(rebuilt[name], tensor), name


def _train_and_save(rank, world, cfg):
    trainer = Trainer.create(cfg, [np.arange(9) % 61] * 8, None)
    trainer.train_step()
    trainer.save()


def test_tp_ranks_built_from_a_hugging_face_directory_equal_the_import(tmp_path):
    hf_model("llama-gqa-untied").save_pretrained(tmp_path / "hf")
    spawn(_build, 2, f"hf:{tmp_path / 'hf'}", 2, 1, str(tmp_path / "tp2.pt"), True)
    reference, _, _ = load_model(f"hf:{tmp_path / 'hf'}")
    rebuilt = torch.load(tmp_path / "tp2.pt")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(rebuilt[name], tensor), name
