"""Older Hugging Face checkpoints: `pytorch_model.bin`, single or sharded, load as the same
model as their safetensors form, and anything but a plain tensor state dict is refused."""

import json

import pytest
import torch
from hf_reference import hf_model, tokens

from megaloom.errors import CheckpointError
from megaloom.interop import load_hf_model


def save_bin(reference, directory, shards: int = 1) -> None:
    """Write `reference` as transformers did before safetensors: torch.save of the state dict,
    split over `shards` files with a `pytorch_model.bin.index.json` when more than one."""
    reference.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    names = sorted(state)
    weight_map = {}
    for k in range(shards):
        shard = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = names[k::shards]
        torch.save({n: state[n] for n in part}, directory / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("shape", ["gpt2-tied-padded", "llama-gqa-untied"])
def test_bin_checkpoint_gives_the_reference_logits(tmp_path, shape, shards):
    reference = hf_model(shape, seed=4).eval()
    save_bin(reference, tmp_path, shards)
    model, config, _ = load_hf_model(tmp_path)
    ids = tokens(config.model.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids)[..., : config.model.vocab_size],
                                   reference(ids).logits, atol=1e-4, rtol=0)


def test_safetensors_wins_over_bin(tmp_path):
    reference = hf_model("gpt2-tied-padded", seed=4)
    reference.save_pretrained(tmp_path)
    torch.save({"junk": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    model, config, _ = load_hf_model(tmp_path)  # the .bin would fail to map
    ids = tokens(config.model.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids)[..., : config.model.vocab_size],
                                   reference.eval()(ids).logits, atol=1e-4, rtol=0)


class Payload:
    """An arbitrary object: unpickling it could run code, so it must be refused."""


@pytest.mark.parametrize("content", ["empty", "truncated", "object", "not-a-dict"])
def test_bad_bin_files_are_refused_with_the_file_named(tmp_path, content):
    hf_model("gpt2-tied-padded").config.save_pretrained(tmp_path)
    path = tmp_path / "pytorch_model.bin"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "truncated":
        torch.save({"w": torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "object":
        torch.save({"w": Payload()}, path)
    else:
        torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_hf_model(tmp_path)


def test_directory_without_weights_names_what_it_looked_for(tmp_path):
    hf_model("gpt2-tied-padded").config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_hf_model(tmp_path)
