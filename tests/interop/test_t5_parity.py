"""T5 interop: logits equal to `transformers`' `T5ForConditionalGeneration` (v1.0 and v1.1
shapes) in both directions, with a source padding mask, a bit-exact round trip, and refusals
that name the field."""

import json

import pytest
import torch
from hf_reference import randomize_
from safetensors.torch import load_file, save_file
from transformers import T5Config, T5ForConditionalGeneration

from megaloom.interop import export_hf, load_hf_model
from megaloom.interop.hf_config import UnsupportedModelError
from megaloom.interop.weights import megaloom_to_hf

ATOL = 1e-4

# name -> (T5Config kwargs, whether the head is a separate lm_head tensor)
SHAPES = {
    # v1.0: ReLU MLP, tied head, decoder output scaled; odd vocabulary, 3 heads of 8
    "t5-v1.0-odd-vocab": (dict(vocab_size=101, d_model=24, d_kv=8, d_ff=40, num_layers=2,
                               num_heads=3, feed_forward_proj="relu"), False),
    # v1.1: gated GELU, untied head, no scaling; more decoder layers, d_kv * heads != d_model
    "t5-v1.1-untied": (dict(vocab_size=128, d_model=32, d_kv=12, d_ff=48, num_layers=2,
                            num_decoder_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
                            relative_attention_num_buckets=16, relative_attention_max_distance=20,
                            tie_word_embeddings=False), True),
    # an untied head with the decoder output scaled (scale_decoder_outputs kept from the file)
    "t5-untied-scaled": (dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                              num_heads=4, feed_forward_proj="relu"), True),
    # SwiGLU MLP (gated-silu) and exact GELU
    "t5-gated-silu": (dict(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                           num_heads=4, feed_forward_proj="gated-silu"), False),
    "t5-gelu": (dict(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                     num_heads=2, feed_forward_proj="gelu"), False),
    # v1.1 as transformers 5 writes it: tied head, scale_decoder_outputs false
    "t5-v1.1-tied": (dict(vocab_size=77, d_model=32, d_kv=8, d_ff=64, num_layers=3,
                          num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                          tie_word_embeddings=False), False),
}


@pytest.fixture(params=list(SHAPES))
def shape(request):
    return request.param


def reference_dir(shape: str, directory) -> T5ForConditionalGeneration:
    """A random HF T5 of `shape` saved in `directory` (an untied head written as its own
    tensor, as v1.1 checkpoints store it)."""
    kwargs, untied = SHAPES[shape]
    torch.manual_seed(0)
    model = randomize_(T5ForConditionalGeneration(T5Config(**kwargs)), seed=0)
    model.save_pretrained(directory)
    if untied:
        weights = load_file(directory / "model.safetensors")
        weights["lm_head.weight"] = 0.08 * torch.randn(weights["shared.weight"].shape,
                                                       generator=torch.Generator().manual_seed(3))
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((directory / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (directory / "config.json").write_text(json.dumps(config))
    return T5ForConditionalGeneration.from_pretrained(directory).eval()


def inputs(vocab: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(2, vocab, (2, 13), generator=generator)
    target = torch.randint(2, vocab, (2, 9), generator=generator)
    target[:, 0] = 0  # the decoder start token
    keep = torch.ones(2, 13, dtype=torch.bool)
    keep[1, 9:] = False  # the second source is padded
    return source, target, keep


@torch.no_grad()
def hf_logits(model, source, target, keep):
    return model(input_ids=source, attention_mask=keep.long(), decoder_input_ids=target).logits


def test_import_matches_transformers(shape, tmp_path):
    reference = reference_dir(shape, tmp_path / "hf")
    model, config, _ = load_hf_model(tmp_path / "hf")
    vocab = config.model.vocab_size
    source, target, keep = inputs(vocab)
    with torch.no_grad():
        ours = model.eval()(source, target, attn_mask=keep)[..., :vocab]
    theirs = hf_logits(reference, source, target, keep)
    assert theirs.abs().max() > 0.1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    kwargs, untied = SHAPES[shape]
    assert config.model.tie_embeddings is not untied
    assert config.model.activation == {"relu": "relu", "gelu": "gelu", "gated-gelu": "geglu",
                                       "gated-silu": "swiglu"}[kwargs["feed_forward_proj"]]


def test_export_matches_and_round_trip_is_bit_exact(shape, tmp_path):
    reference = reference_dir(shape, tmp_path / "hf")
    model, config, _ = load_hf_model(tmp_path / "hf")
    export_hf(model, config, tmp_path / "out")
    exported = T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    source, target, keep = inputs(config.model.vocab_size, seed=2)
    torch.testing.assert_close(hf_logits(exported, source, target, keep),
                               hf_logits(reference, source, target, keep), atol=ATOL, rtol=0)
    again, _, _ = load_hf_model(tmp_path / "out")
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    hf_state = megaloom_to_hf(first, config.model)
    assert set(hf_state) == set(load_file(tmp_path / "out" / "model.safetensors"))


@pytest.mark.parametrize("field, value", [("feed_forward_proj", "gated-relu"),
                                          ("is_decoder", True)])
def test_unsupported_fields_are_named(tmp_path, field, value):
    T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32,
                                        num_layers=1, num_heads=4)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=field):
        load_hf_model(tmp_path)
