"""Checkpoint files: sharded round trip, integrity errors by file name, atomic saves, pruning,
the single-file format of earlier versions, and the box arithmetic under ZeRO shards."""

import errno
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from megaloom.checkpoint.files import write_manifest
from megaloom.checkpoint.reader import find_latest
from megaloom.checkpoint.shards import ShardWriter, flat_range_boxes
from megaloom.config import Config, ModelConfig, TrainConfig
from megaloom.errors import CheckpointError
from megaloom.loading import load_model
from megaloom.model import GPT
from megaloom.train.checkpoint import prune_checkpoints
from megaloom.train.optim import parameter_groups
from megaloom.train.trainer import Trainer

DATA = [np.arange(9) % 50 for _ in range(16)]


def make(tmp_path, arch="gpt2", steps=1, keep_last=2):
    cfg = Config(model=ModelConfig(arch=arch, num_layers=1, hidden_size=32, num_heads=4,
                                   vocab_size=50, seq_len=8),
                 train=TrainConfig(out_dir=str(tmp_path), micro_batch_size=2,
                                   global_batch_size=2, max_steps=steps, warmup_steps=0,
                                   keep_last=keep_last, eval_interval=100))
    trainer = Trainer.create(cfg, DATA, None)
    for _ in range(steps):
        trainer.train_step()
    return cfg, trainer


def adam_state(trainer):
    return {id(p): s for p, s in trainer.optimizer.optimizer.state.items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_and_load_round_trip(tmp_path, arch):
    cfg, trainer = make(tmp_path, arch)
    path = trainer.save()
    assert path.name == "step_00000001" and (tmp_path / "checkpoints" / "latest").is_file()
    loaded, loaded_cfg, tokenizer = load_model(tmp_path)
    assert loaded_cfg.model == cfg.model and tokenizer is None
    for (name, a), (_, b) in zip(trainer.model.state_dict().items(),
                                 loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    _, fresh = make(tmp_path / "fresh", arch, steps=0)
    fresh.resume(path)
    assert fresh.step == 1
    for p, q in zip(trainer.params, fresh.params, strict=True):
        want, got = trainer.optimizer.optimizer.state[p], fresh.optimizer.optimizer.state[q]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got[key], want[key]), key


def test_keep_last_and_latest_pointer(tmp_path):
    _, trainer = make(tmp_path)
    for step in (1, 2, 3, 4):
        trainer.step = step
        trainer.save()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_00000003", "step_00000004"]
    assert find_latest(tmp_path).name == "step_00000004"


def test_pruning_never_deletes_the_checkpoint_latest_names(tmp_path):
    _, trainer = make(tmp_path, keep_last=1)
    good = trainer.save()
    # killed after renaming a newer step directory but before `latest` moved
    (tmp_path / "checkpoints" / "step_00000009").mkdir()
    prune_checkpoints(tmp_path / "checkpoints", keep_last=1)
    assert good.is_dir() and find_latest(tmp_path) == good


def test_corrupted_truncated_and_missing_shards_are_named(tmp_path):
    _, trainer = make(tmp_path)
    path = trainer.save()
    shard = path / "shard_00000.safetensors"
    original = shard.read_bytes()
    shard.write_bytes(original[:-7] + b"garbage")
    with pytest.raises(CheckpointError, match="shard_00000.safetensors is corrupted"):
        load_model(tmp_path)
    shard.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match="shard_00000.safetensors is corrupted"):
        load_model(tmp_path)
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard_00000.safetensors is missing"):
        load_model(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "nope")


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    _, trainer = make(tmp_path, keep_last=1)
    good = trainer.save()
    before = (good / "shard_00000.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ShardWriter, "write", explode)
    trainer.step = 2
    with pytest.raises(CheckpointError, match="rank 0: disk full: .*No space left on device"):
        trainer.save()
    monkeypatch.undo()
    assert find_latest(tmp_path) == good
    assert (good / "shard_00000.safetensors").read_bytes() == before
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert sorted(leftovers) == ["latest", "step_00000001"]
    load_model(tmp_path)


def legacy_checkpoint(directory, cfg, model, optimizer):
    """The single-process layout earlier megaloom versions wrote."""
    directory.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"))
    cfg.save(directory / "config.yaml")
    torch.save({"optimizer": optimizer.state_dict(), "rng": {"cpu": torch.get_rng_state()}},
               directory / "optimizer.pt")
    (directory / "trainer_state.json").write_text(json.dumps({"step": 5, "skipped_steps": 0}))
    write_manifest(directory)


def test_checkpoints_of_earlier_versions_still_load_and_resume(tmp_path):
    cfg, trainer = make(tmp_path / "run")
    model = GPT(cfg.model)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-2)
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    optimizer.step()
    legacy_checkpoint(tmp_path / "old", cfg, model, optimizer)
    loaded, _, _ = load_model(tmp_path / "old")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    trainer.resume(tmp_path / "old")
    assert trainer.step == 5
    plain = {id(p): n for n, p in model.named_parameters()}
    mine = {id(p): n for n, p in trainer.model.named_parameters()}
    by_name = {plain[id(p)]: s for p, s in optimizer.state.items()}
    for param, state in trainer.optimizer.optimizer.state.items():
        torch.testing.assert_close(state["exp_avg"], by_name[mine[id(param)]]["exp_avg"],
                                   rtol=0, atol=0)
        assert int(state["step"]) == 1


def test_optimizer_file_refuses_arbitrary_pickles(tmp_path):
    cfg, trainer = make(tmp_path / "run")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    model = GPT(cfg.model)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1))
    legacy_checkpoint(tmp_path / "old", cfg, model, optimizer)
    torch.save({"optimizer": Evil(), "rng": {}}, tmp_path / "old" / "optimizer.pt")
    write_manifest(tmp_path / "old")  # even with a matching manifest it must be refused
    with pytest.raises(CheckpointError, match="cannot read .*optimizer.pt"):
        trainer.resume(tmp_path / "old")


def test_model_config_mismatch_is_named(tmp_path):
    _, trainer = make(tmp_path)
    path = trainer.save()
    other = Config(model=ModelConfig(num_layers=1, hidden_size=64, num_heads=4, vocab_size=50,
                                     seq_len=8), train=TrainConfig(out_dir=str(tmp_path / "b")))
    with pytest.raises(CheckpointError, match="model.hidden_size"):
        Trainer.create(other, DATA, None).resume(path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest) == {"shard_00000.safetensors", "config.yaml", "trainer_state.json"}


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 2, 3)])
def test_flat_ranges_are_covered_exactly_by_boxes(shape):
    numel = int(np.prod(shape))
    values = torch.arange(numel).reshape(shape)
    width = int(np.prod(shape[1:])) if len(shape) > 2 else 1
    for start in range(0, numel, width):
        for stop in range(start, numel + 1, width):
            boxes = flat_range_boxes(shape, start, stop)
            assert len(boxes) <= 3
            got = torch.cat([values[tuple(slice(lo, hi) for lo, hi in box)].reshape(-1)
                             for box in boxes]) if boxes else torch.empty(0, dtype=torch.long)
            assert got.tolist() == list(range(start, stop))
