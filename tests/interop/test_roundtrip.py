"""Round trips through `megaloom convert`: HF -> megaloom -> HF gives the original tensors
(single and sharded safetensors), the megaloom checkpoint loads with `load_model`, and
tokenizers come back loadable by `AutoTokenizer`."""

import json

import pytest
import torch
from hf_reference import hf_config, hf_model, megaloom_config, randomize_, tokens
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from megaloom.cli import main
from megaloom.data.tokenizer import Tokenizer, train_bpe
from megaloom.interop import export_hf
from megaloom.loading import load_model
from megaloom.model.gpt import GPT

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs.\n" * 40


def files_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `directory` (read without megaloom code)."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("shard", [None, "20KB"])
@pytest.mark.parametrize("via", ["checkpoint", "hf-spec"])
def test_hf_megaloom_hf_round_trip_is_exact(tmp_path, shape, shard, via):
    reference = hf_model(shape, seed=7)
    reference.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == bool(shard)
    source = f"hf:{tmp_path / 'hf'}"
    if via == "checkpoint":
        assert main(["convert", "hf-to-megaloom", str(tmp_path / "hf"), str(tmp_path / "ml")]) == 0
        source = str(tmp_path / "ml")
        model, config, _ = load_model(source)
        ids = tokens(config.model.vocab_size)
        with torch.no_grad():
            torch.testing.assert_close(model(ids)[..., : config.model.vocab_size],
                                       reference(ids).logits, atol=1e-4, rtol=0)
    extra = ["--max-shard-size", shard] if shard else []
    assert main(["convert", "megaloom-to-hf", source, str(tmp_path / "out"), *extra]) == 0

    original, exported = files_tensors(tmp_path / "hf"), files_tensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    index = tmp_path / "out" / "model.safetensors.index.json"
    assert index.is_file() == bool(shard)
    if shard:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert sorted(weight_map) == sorted(original)
        assert len(set(weight_map.values())) > 1
    want = hf_config(shape).to_dict()
    got = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("model_type", "vocab_size", "tie_word_embeddings", "n_embd", "n_layer", "n_head",
                "n_positions", "activation_function", "layer_norm_epsilon", "hidden_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "max_position_embeddings", "rope_parameters"):
        if key in want:
            assert got[key] == want[key], key
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # loads without missing weights


def _hf_tokenizer(tmp_path) -> PreTrainedTokenizerFast:
    (tmp_path / "corpus.txt").write_text(TEXT)
    train_bpe([tmp_path / "corpus.txt"], 300, tmp_path / "bpe.json", special_tokens=["<s>", "</s>"],
              min_frequency=1, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "bpe.json"), bos_token="<s>",
                                   eos_token="</s>")


def test_tokenizer_and_special_ids_survive_the_round_trip(tmp_path):
    tokenizer = _hf_tokenizer(tmp_path)
    config = hf_config("llama-gqa-untied")
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    randomize_(AutoModelForCausalLM.from_config(config), seed=8).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")

    assert main(["convert", "hf-to-megaloom", str(tmp_path / "hf"), str(tmp_path / "ml")]) == 0
    assert (tmp_path / "ml" / "tokenizer.json").is_file()
    assert main(["convert", "megaloom-to-hf", str(tmp_path / "ml"), str(tmp_path / "out")]) == 0

    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "the lazy fox packs five jugs"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.bos_token, loaded.eos_token) == ("<s>", "</s>")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["bos_token_id"] == tokenizer.bos_token_id
    assert exported["eos_token_id"] == tokenizer.eos_token_id


def test_export_with_megaloom_trained_tokenizer_loads_in_transformers(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    ours = train_bpe([tmp_path / "corpus.txt"], 290, tmp_path / "tokenizer.json",
                     min_frequency=1, show_progress=False)
    config = megaloom_config("gpt2-tied-padded")
    config.vocab_size = ours.vocab_size
    export_hf(GPT(config), config, tmp_path / "out", tokenizer_path=tmp_path / "tokenizer.json")

    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "Pack my box with five dozen jugs."
    assert loaded(text)["input_ids"] == ours.encode(text)
    assert loaded.eos_token == loaded.bos_token == "<|endoftext|>"
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["eos_token_id"] == exported["bos_token_id"] == Tokenizer.from_file(
        tmp_path / "tokenizer.json").eod_id


def test_convert_refuses_a_non_empty_output_and_keeps_it(tmp_path, capsys):
    hf_model("llama-mha").save_pretrained(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    assert main(["convert", "hf-to-megaloom", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    assert main(["convert", "megaloom-to-hf", f"hf:{tmp_path / 'hf'}", str(tmp_path / "out")]) == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


def test_shard_sizes_parse_like_transformers_and_typos_fail(tmp_path, capsys):
    from megaloom.interop.weight_files import parse_size

    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("20KB") == 20_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234
    assert main(["convert", "megaloom-to-hf", "hf:nowhere", str(tmp_path / "o"),
                 "--max-shard-size", "5XB"]) == 2
    assert "5XB" in capsys.readouterr().err
