import pytest
import yaml

from megaloom.config import Config, ConfigError, load_config


def test_overrides_parse_types_and_fill_flavour_defaults():
    cfg = load_config(None, ["model.arch=llama", "train.lr=3e-4", "model.num_layers=2",
                             "model.num_kv_heads=2", "data.prefixes=[0.3, a, 0.7, b]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.num_layers == 2
    assert (cfg.model.norm, cfg.model.activation, cfg.model.position_embedding) == (
        "rmsnorm", "swiglu", "rope")
    assert cfg.model.bias is False and cfg.model.tie_embeddings is False
    assert cfg.data.prefixes == [0.3, "a", 0.7, "b"]


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"model\.num_layer'.*did you mean 'model\.num_layers'"):
        load_config(None, ["model.num_layer=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*'train'"):
        load_config(None, ["trian.lr=1"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lr=abc", "train.lr: expected float"),
        ("model.num_layers=2.5", "model.num_layers: expected int"),
        ("train.precision=fp8", "train.precision: 'fp8' is not one of"),
        ("model.dropout=true", "model.dropout: expected float"),
        ("model.num_heads=3", "model.hidden_size: 256 is not divisible"),
        ("train.global_batch_size=12", "train.global_batch_size: 12 is not a multiple"),
        ("model.num_kv_heads=3", "model.num_kv_heads"),
        ("train", "must look like key.sub=value"),
        ("model.init_std=-1", "model.init_std: must be > 0"),
        ("model.ffn_hidden_size=0", "model.ffn_hidden_size: must be >= 1"),
        ("model.rope_theta=0", "model.rope_theta: must be > 0"),
        ("model.norm_eps=.nan", "model.norm_eps"),
        ("train.adam_beta1=2", "train.adam_beta1: must be in"),
        ("train.adam_beta2=-0.1", "train.adam_beta2: must be in"),
        ("train.adam_eps=0", "train.adam_eps: must be > 0"),
        ("train.lr=inf", "train.lr: must be finite"),
        ("train.lr=.nan", "train.lr"),
        ("train.grad_clip=.inf", "train.grad_clip: must be finite"),
        ("train.weight_decay=-1", "train.weight_decay: must be >= 0"),
        ("train.lr_decay_steps=-5", "train.lr_decay_steps: must be >= 1"),
        ("train.initial_loss_scale=0", "train.initial_loss_scale: must be > 0"),
        ("train.loss_scale_window=0", "train.loss_scale_window: must be >= 1"),
        ("train.eval_iters=0", "train.eval_iters: must be >= 1"),
        ("parallel.timeout_s=inf", "parallel.timeout_s: must be finite"),
        ("task.lora.alpha=inf", "task.lora.alpha: must be finite"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("'", "'")):
        load_config(None, [override])


def test_yaml_recipe_round_trip(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  num_layers: 3\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(recipe, ["train.max_steps=7"])
    saved = tmp_path / "resolved.yaml"
    cfg.save(saved)
    again = load_config(saved)
    assert again == cfg and again.model.num_layers == 3 and again.train.max_steps == 7
    assert yaml.safe_load(saved.read_text())["model"]["norm"] == "layernorm"


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)
    bad.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(bad)
    bad.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(bad)
    bad.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="not a YAML text file"):
        load_config(bad)


def test_an_absent_accelerator_is_a_config_error():
    import torch

    from megaloom.utils.device import resolve_device

    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    with pytest.raises(ConfigError, match="no accelerator"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("floppy")


def test_shipped_recipes_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert {"tiny.yaml", "gpt2-124m.yaml", "llama-tiny.yaml"} <= {p.name for p in recipes}
    for recipe in recipes:
        assert isinstance(load_config(recipe), Config)
