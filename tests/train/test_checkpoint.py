import json

import pytest
import torch

from megaloom.config import Config, ModelConfig
from megaloom.errors import CheckpointError
from megaloom.model import GPT
from megaloom.train import checkpoint as ckpt
from megaloom.train.optim import build_optimizer


def make(arch="gpt2"):
    cfg = Config(model=ModelConfig(arch=arch, num_layers=1, hidden_size=32, num_heads=4,
                                   vocab_size=50, seq_len=8))
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.train)
    tokens = torch.randint(0, 50, (2, 8))
    model(tokens).sum().backward()
    opt.step()
    return cfg, model, opt


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_and_load_round_trip(tmp_path, arch):
    cfg, model, opt = make(arch)
    path = ckpt.save_checkpoint(tmp_path, 3, model, cfg, None, opt, {"x": 1}, keep_last=2)
    assert path.name == "step_00000003" and (tmp_path / "checkpoints" / "latest").is_file()
    loaded, loaded_cfg, tokenizer = ckpt.load_model(tmp_path)
    assert loaded_cfg.model == cfg.model and tokenizer is None
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    fresh = GPT(cfg.model)
    fresh_opt = build_optimizer(fresh, cfg.train)
    state = ckpt.load_checkpoint(path, fresh, fresh_opt)
    assert state == {"step": 3, "x": 1}
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"],
                       opt.state_dict()["state"][0]["exp_avg"])


def test_keep_last_and_latest_pointer(tmp_path):
    cfg, model, opt = make()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, cfg, None, opt, {}, keep_last=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_00000003", "step_00000004"]
    assert ckpt.find_latest(tmp_path).name == "step_00000004"


def test_corrupted_and_missing_files_are_reported(tmp_path):
    cfg, model, opt = make()
    path = ckpt.save_checkpoint(tmp_path, 1, model, cfg, None, opt, {}, keep_last=2)
    weights = path / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-7] + b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted"):
        ckpt.load_model(tmp_path)
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        ckpt.load_model(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no checkpoint|missing"):
        ckpt.load_model(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ckpt.load_model(tmp_path / "nope")


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg, model, opt = make()
    good = ckpt.save_checkpoint(tmp_path, 1, model, cfg, None, opt, {}, keep_last=1)
    before = (good / "model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "write_manifest", explode)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model, cfg, None, opt, {}, keep_last=1)
    monkeypatch.undo()
    assert ckpt.find_latest(tmp_path) == good
    assert (good / "model.safetensors").read_bytes() == before
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert sorted(leftovers) == ["latest", "step_00000001"]
    ckpt.load_model(tmp_path)


def test_optimizer_file_refuses_arbitrary_pickles(tmp_path):
    cfg, model, opt = make()
    path = ckpt.save_checkpoint(tmp_path, 1, model, cfg, None, opt, {}, keep_last=1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"optimizer": Evil(), "rng": {}}, path / "optimizer.pt")
    ckpt.write_manifest(path)  # even with a matching manifest the pickle must be refused
    with pytest.raises(CheckpointError, match="cannot read .*optimizer.pt"):
        ckpt.load_checkpoint(path, model, opt)


def test_model_config_mismatch_is_named(tmp_path):
    cfg, model, opt = make()
    path = ckpt.save_checkpoint(tmp_path, 1, model, cfg, None, opt, {}, keep_last=1)
    other = GPT(ModelConfig(num_layers=1, hidden_size=64, num_heads=4, vocab_size=50, seq_len=8))
    with pytest.raises(CheckpointError, match="embed.weight has shape"):
        ckpt.load_weights(other, path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest) == {"model.safetensors", "config.yaml", "optimizer.pt",
                             "trainer_state.json"}
