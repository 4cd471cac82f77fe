"""`megaloom plan` end to end through `megaloom.cli.main`."""

from __future__ import annotations

import json

import pytest
import yaml

from megaloom.cli import main
from megaloom.commands.plan import parse_count
from megaloom.model import preset_config
from megaloom.plan import count_parameters


def run_json(capsys, *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_preset_json(capsys):
    out = run_json(capsys, "tiny-llama", "--gpus", "4", "--tp", "2", "--pp", "2",
                   "--global-batch", "8", "--micro-batch", "2", "--tokens", "1M")
    assert out["parameters"]["total"] == count_parameters(preset_config("tiny-llama"))
    lay = out["layout"]
    assert (lay["dp"], lay["num_micro_batches"], lay["precision"]) == (1, 4, "bf16")
    assert out["flops"]["bubble_fraction"] == pytest.approx(1 / 4)
    assert out["time"]["iterations"] == -(-1_000_000 // (8 * 128))
    assert out["memory"]["fits"] is True and len(out["memory"]["stages"]) == 2


def test_text_table_states_units(capsys):
    assert main(["plan", "gpt2-124m", "--gpu", "h100-sxm", "--tokens", "10B"]) == 0
    text = capsys.readouterr().out
    assert "GiB (2^30 bytes)" in text and "fits" in text and "training" in text


def test_recipe_provides_defaults(tmp_path, capsys):
    recipe = tmp_path / "run.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"arch": "gpt2", "num_layers": 4, "hidden_size": 64, "num_heads": 4,
                  "seq_len": 64, "vocab_size": 500},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 10,
                  "precision": "bf16", "activation_checkpointing": True},
        "parallel": {"tp": 2, "pp": 2, "sequence_parallel": True},
    }))
    out = run_json(capsys, str(recipe), "--gpus", "8")
    lay = out["layout"]
    assert (lay["tp"], lay["pp"], lay["dp"], lay["micro_batch"], lay["global_batch"]) == (
        2, 2, 2, 2, 8)
    assert (lay["recompute"], lay["sequence_parallel"]) == ("full", True)
    assert out["time"]["tokens"] == 10 * 8 * 64


def test_model_only_recipe_takes_the_planners_defaults(tmp_path, capsys):
    """A file with only a model section is a shape, not a run: bf16 and the batch flags'
    defaults apply (not the trainer's fp32, micro-batch 8, global batch 8)."""
    shape = {"arch": "gpt2", "num_layers": 4, "hidden_size": 64, "num_heads": 4,
             "seq_len": 64, "vocab_size": 500}
    model_only = tmp_path / "model.yaml"
    model_only.write_text(yaml.safe_dump({"model": shape}))
    lay = run_json(capsys, str(model_only), "--gpus", "8", "--tflops", "140")["layout"]
    assert (lay["precision"], lay["micro_batch"], lay["global_batch"], lay["dp"]) == (
        "bf16", 1, 8, 8)


def test_shape_flags_equal_a_recipe_with_that_shape(tmp_path, capsys):
    recipe = tmp_path / "model.yaml"
    recipe.write_text(yaml.safe_dump({"model": {
        "arch": "llama", "num_layers": 6, "hidden_size": 256, "num_heads": 8, "num_kv_heads": 2,
        "seq_len": 512, "vocab_size": 1000}}))
    want = run_json(capsys, str(recipe), "--gpus", "2", "--tp", "2")
    got = run_json(capsys, "tiny-llama", "--layers", "6", "--hidden", "256", "--heads", "8",
                   "--kv-heads", "2", "--seq-len", "512", "--vocab", "1000", "--gpus", "2",
                   "--tp", "2")
    assert got["parameters"] == want["parameters"] and got["memory"] == want["memory"]
    assert got["flops"] == want["flops"]


def test_help_names_where_defaults_come_from(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("memory GiB (2^30 bytes)", "biases, norms and the padded vocabulary's head",
                  "the recipe's train.micro_batch_size, else 1",
                  "the recipe's train.precision, else bf16", "the recipe's parallel.tp, else 1"):
        assert words in text


def test_zero_stages_shard_model_state_over_dp(capsys):
    """--distributed-optimizer is --zero 1; stage 3 divides every kind of model state by dp."""
    argv = ("gpt2-124m", "--gpus", "8", "--global-batch", "8", "--grad-dtype", "bf16")
    stage = {zero: run_json(capsys, *argv, "--zero", str(zero))["memory"]["stages"][0]
             for zero in (0, 1, 2, 3)}
    assert run_json(capsys, *argv, "--distributed-optimizer")["memory"] == run_json(
        capsys, *argv, "--zero", "1")["memory"]
    for zero, sharded in ((1, "optimizer"), (2, "gradients"), (3, "weights")):
        assert stage[zero][sharded] == pytest.approx(stage[0][sharded] / 8)
        assert stage[zero - 1][sharded] == stage[0][sharded]


def test_hfu_convention_changes_selective_recompute_only(capsys):
    argv = ("gpt2-124m", "--recompute", "selective")
    eq8, prose = (run_json(capsys, *argv, "--hfu-convention", name)["flops"]
                  for name in ("eq8", "prose"))
    cfg = preset_config("gpt2-124m")
    assert eq8["hardware_per_token"] - prose["hardware_per_token"] == pytest.approx(
        8 * cfg.num_layers * cfg.hidden_size * cfg.seq_len)
    assert eq8["model_per_token"] == prose["model_per_token"]


def test_search_json(capsys):
    out = run_json(capsys, "gpt2-355m", "--search", "--gpus", "16", "--global-batch", "32",
                   "--gpu", "a100-40gb", "--top", "5")
    assert 1 <= len(out["plans"]) <= 5
    for plan in out["plans"]:
        lay = plan["layout"]
        assert lay["tp"] * lay["pp"] * lay["dp"] == 16 and plan["memory"]["fits"]


@pytest.mark.parametrize("argv,message", [
    (["tiny", "--tp", "3", "--gpus", "3"], "model.num_heads=4 is not divisible by parallel.tp=3"),
    (["tiny", "--tp", "2", "--gpus", "6", "--pp", "2"], "not divisible by tp x pp"),
    (["tiny", "--gpus", "4", "--global-batch", "6"], "train.global_batch_size=6 is not a multiple"),
    (["tiny", "--pp", "5", "--gpus", "5"], "model.num_layers=4 is smaller than parallel.pp"),
    (["no-such-model"], "neither a YAML file nor a preset"),
    (["tiny", "--gpu", "v100"], "no bf16"),
    (["tiny", "--tflops", "5000"], "exceeds"),
    (["tiny", "--search"], "--search needs --gpus"),
    (["tiny", "--search", "--gpus", "2", "--tp", "2"], "--search chooses --tp itself"),
    (["tiny", "--search", "--gpus", "2"], "--search needs --global-batch"),
    (["tiny", "--tokens", "nan"], "--tokens must be a finite number > 0"),
    (["tiny", "--tokens", "inf"], "--tokens must be a finite number > 0"),
    (["tiny", "--tokens", "1e400"], "--tokens must be a finite number > 0"),
    (["tiny", "--tflops", "nan"], "--tflops must be a finite number > 0"),
    (["tiny", "--mfu", "1.5"], "--mfu must be in (0, 1]"),
    (["tiny", "--allowance-gib", "nan"], "--allowance-gib must be a finite number >= 0"),
    (["tiny", "--tp", "0"], "--tp must be >= 1"),
    (["tiny", "--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
    (["gpt3-175b", "--search", "--gpus", "7", "--global-batch", "8"], "no layout exists"),
    (["tiny", "--hidden", "100", "--heads", "3"], "model.hidden_size: 100 is not divisible"),
    (["tiny", "--layers", "0"], "--layers must be >= 1"),
    (["tiny", "--zero", "0", "--distributed-optimizer"], "--zero 0 contradicts"),
])
def test_errors_are_one_line(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_parse_count():
    assert parse_count("270B") == 270e9
    assert parse_count("2.7e11") == 2.7e11
    assert parse_count("300m") == 300e6
