"""Whatever megaloom cannot represent exactly is refused with an error naming the field or
tensor, never converted into a silently different model."""

import json

import pytest
import torch
from hf_reference import hf_model, megaloom_config
from safetensors.torch import load_file, save_file

from megaloom.cli import main
from megaloom.config import ModelConfig
from megaloom.errors import CheckpointError, MegaloomError
from megaloom.interop import UnsupportedModelError, export_hf, load_hf_model
from megaloom.model.gpt import GPT

GPT2_FIELDS = [
    ("model_type", "mistral"),
    ("architectures", ["GPT2DoubleHeadsModel"]),
    ("scale_attn_weights", False),
    ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True),
    ("add_cross_attention", True),
    ("activation_function", "relu"),
]
LLAMA_FIELDS = [
    ("hidden_act", "gelu"),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("sliding_window", 4096),
    ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5}),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny GPT-2 and Llama directory to copy and corrupt."""
    root = tmp_path_factory.mktemp("hf")
    for arch, shape in (("gpt2", "gpt2-tied-padded"), ("llama", "llama-gqa-untied")):
        hf_model(shape).save_pretrained(root / arch)
    return root


def _variant(saved, tmp_path, arch, edit_config=None, edit_weights=None):
    out = tmp_path / arch
    out.mkdir()
    config = json.loads((saved / arch / "config.json").read_text())
    weights = load_file(saved / arch / "model.safetensors")
    if edit_config:
        edit_config(config)
    if edit_weights:
        edit_weights(weights)
    (out / "config.json").write_text(json.dumps(config))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


CONFIG_CASES = [("gpt2", *f) for f in GPT2_FIELDS] + [("llama", *f) for f in LLAMA_FIELDS]


@pytest.mark.parametrize(("arch", "field", "value"), CONFIG_CASES)
def test_unsupported_config_field_is_named(saved, tmp_path, arch, field, value):
    directory = _variant(saved, tmp_path, arch, edit_config=lambda c: c.update({field: value}))
    with pytest.raises(UnsupportedModelError, match=field):
        load_hf_model(directory)


def test_cli_prints_one_line_naming_the_field(saved, tmp_path, capsys):
    directory = _variant(saved, tmp_path, "llama",
                         edit_config=lambda c: c.update(attention_bias=True))
    assert main(["convert", "hf-to-megaloom", str(directory), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "attention_bias" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_legacy_rope_theta_and_default_rope_scaling_are_accepted(saved, tmp_path):
    def legacy(config):
        theta = config.pop("rope_parameters")["rope_theta"]
        config.update(rope_theta=theta, rope_scaling=None)

    model, config, _ = load_hf_model(_variant(saved, tmp_path, "llama", edit_config=legacy))
    assert config.model.rope_theta == megaloom_config("llama-gqa-untied").rope_theta


def _drop(name):
    return lambda weights: weights.pop(name)


def _add_extra(weights):
    weights["score.weight"] = torch.zeros(2, 32)


def _reshape_qkv(weights):
    name = "transformer.h.0.attn.c_attn.weight"
    weights[name] = weights[name][:, :-3].contiguous()


def _untie(weights):
    weights["lm_head.weight"] = weights["transformer.wte.weight"] + 1


@pytest.mark.parametrize(("arch", "edit", "message"), [
    ("llama", _drop("model.layers.1.self_attn.k_proj.weight"), "k_proj"),
    ("llama", _drop("lm_head.weight"), "lm_head.weight"),
    ("gpt2", _add_extra, "score.weight"),
    ("gpt2", _reshape_qkv, "c_attn"),
    ("gpt2", _untie, "tie_word_embeddings"),
])
def test_weights_that_do_not_match_the_config_are_named(saved, tmp_path, arch, edit, message):
    directory = _variant(saved, tmp_path, arch, edit_weights=edit)
    with pytest.raises(CheckpointError, match=message):
        load_hf_model(directory)


@pytest.mark.parametrize(("overrides", "field"), [
    (dict(arch="gpt2", num_kv_heads=2), "num_kv_heads"),
    (dict(arch="gpt2", norm="rmsnorm"), "model.norm"),
    (dict(arch="llama", bias=True), "model.bias"),
    (dict(arch="llama", activation="gelu"), "model.activation"),
    (dict(arch="llama", position_embedding="learned"), "model.position_embedding"),
])
def test_export_refuses_flavours_hf_cannot_express(tmp_path, overrides, field):
    config = ModelConfig(hidden_size=32, num_layers=1, num_heads=4, vocab_size=64, seq_len=16,
                         **overrides)
    with pytest.raises(MegaloomError, match=field):
        export_hf(GPT(config), config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
