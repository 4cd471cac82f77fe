"""`convert megaloom-to-hf` streams a checkpoint: each HF file is written after reading only
the megaloom tensors it needs, and the files equal an export of the fully loaded model."""

import numpy as np
import torch
from safetensors.torch import load_file

from megaloom.checkpoint.reader import LazyState, open_checkpoint
from megaloom.config import Config, ModelConfig, TrainConfig
from megaloom.interop import export_hf, weight_files
from megaloom.loading import load_model
from megaloom.train.trainer import Trainer


def test_lazy_export_reads_tensor_by_tensor_and_matches_full_export(tmp_path, monkeypatch):
    cfg = Config(model=ModelConfig(arch="llama", num_layers=3, hidden_size=32, num_heads=4,
                                   num_kv_heads=2, vocab_size=50, seq_len=8),
                 train=TrainConfig(out_dir=str(tmp_path / "run")))
    trainer = Trainer.create(cfg, [np.arange(9) % 50] * 8, None)
    trainer.save()
    lazy = LazyState(open_checkpoint(tmp_path / "run"))
    reads, at_write = [], []
    original_get, original_save = LazyState.__getitem__, weight_files.save_file

    def counting_get(self, name):
        reads.append(name)
        return original_get(self, name)

    def recording_save(tensors, path, metadata=None):
        at_write.append(len(reads))
        original_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(LazyState, "__getitem__", counting_get)
    monkeypatch.setattr(weight_files, "save_file", recording_save)
    export_hf(lazy, cfg, tmp_path / "lazy", max_shard_size=20_000)
    monkeypatch.undo()
    assert len(at_write) > 3 and at_write == sorted(at_write) and at_write[0] < len(reads) / 2
    assert len(reads) == len(set(reads)) == len(lazy)  # every tensor read once
    model, _, _ = load_model(tmp_path / "run")
    export_hf(model, cfg, tmp_path / "full", max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "full").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "lazy").glob("*.safetensors"))
    for name in files:
        want, got = load_file(tmp_path / "full" / name), load_file(tmp_path / "lazy" / name)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), key
