"""Damaged checkpoint files, as a new user met them: each is refused with one line that names
the file, by every reader (`generate`, `convert`, resume), never a traceback."""

import json
import shutil

import pytest
import torch
from test_checkpoint import legacy_checkpoint, make

from megaloom.checkpoint.files import write_manifest
from megaloom.cli import main
from megaloom.errors import CheckpointError


def _json(path, value):
    path.write_text(json.dumps(value))


def _manifest(step, edit):
    manifest = json.loads((step / "manifest.json").read_text())
    _json(step / "manifest.json", edit(manifest))


CASES = {  # name: (damage(step dir, run dir), rewrite the manifest after, words in the error)
    "manifest is a list": (lambda s, r: _json(s / "manifest.json", []), False,
                           "manifest.json: expected a JSON object, got list"),
    "manifest entry without bytes": (
        lambda s, r: _manifest(s, lambda m: {**m, "config.yaml": {"sha256": "0" * 64}}),
        False, "entry 'config.yaml': 'bytes' must be an integer"),
    "manifest entry is a string": (
        lambda s, r: _manifest(s, lambda m: {**m, "config.yaml": "abc"}), False,
        "entry 'config.yaml' must be an object"),
    "manifest names a path outside": (
        lambda s, r: _manifest(s, lambda m: {**m, "../x": m["config.yaml"]}), False,
        "is not a file name in the checkpoint directory"),
    "binary config.yaml": (lambda s, r: (s / "config.yaml").write_bytes(bytes(range(256))),
                           True, "config.yaml: not a YAML text file"),
    "config.yaml with an unknown key": (
        lambda s, r: (s / "config.yaml").write_text("model:\n  colour: blue\n"), True,
        "model.colour"),
    "binary latest": (lambda s, r: (r / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00"),
                      False, "cannot read"),
    "latest names no step": (lambda s, r: (r / "checkpoints" / "latest").write_text("../.."),
                             False, "must name a step directory"),
    "trainer_state.json is {}": (lambda s, r: _json(s / "trainer_state.json", {}), True,
                                 "trainer_state.json: no 'step'"),
    "trainer_state.json is a list": (lambda s, r: _json(s / "trainer_state.json", [1]), True,
                                     "trainer_state.json: expected a JSON object"),
    "trainer_state.json step is text": (
        lambda s, r: _json(s / "trainer_state.json", {"step": "5"}), True,
        "'step' must be int"),
    "truncated shard": (
        lambda s, r: (s / "shard_00000.safetensors").write_bytes(
            (s / "shard_00000.safetensors").read_bytes()[:100]), False, "is corrupted"),
}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    _, trainer = make(root)
    trainer.save()
    return root


def damaged(good_run, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    damage, rewrite, _ = CASES[name]
    step = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    damage(step, run)
    if rewrite:
        write_manifest(step)
    return run


def one_error_line(capfd):
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_every_reader_names_the_damaged_file(good_run, tmp_path, capfd, name):
    expected = CASES[name][2]
    run = damaged(good_run, tmp_path, name)
    assert main(["generate", str(run), "hi", "--max-tokens", "2"]) == 2
    assert expected in one_error_line(capfd)
    assert main(["convert", "megaloom-to-hf", str(run), str(tmp_path / "hf")]) == 2
    assert expected in one_error_line(capfd)
    assert not (tmp_path / "hf").exists()
    _, trainer = make(tmp_path / "fresh", steps=0)
    with pytest.raises(CheckpointError) as caught:
        trainer.resume(run)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_corrupted_optimizer_file_is_one_line(tmp_path):
    cfg, trainer = make(tmp_path / "run")
    model = trainer.model
    optimizer = torch.optim.AdamW(model.parameters())
    legacy_checkpoint(tmp_path / "old", cfg, model, optimizer)
    (tmp_path / "old" / "optimizer.pt").write_bytes(b"PK\x03\x04 not a zip archive at all")
    write_manifest(tmp_path / "old")
    with pytest.raises(CheckpointError, match="cannot read .*optimizer.pt") as caught:
        trainer.resume(tmp_path / "old")
    assert "\n" not in str(caught.value)


def test_weights_only_checkpoint_cannot_be_resumed(tmp_path):
    from megaloom.checkpoint.files import save_model_files

    cfg, trainer = make(tmp_path / "run")
    save_model_files(tmp_path / "weights", trainer.model, cfg)
    with pytest.raises(CheckpointError, match="holds weights only .*model.init_from="):
        trainer.resume(tmp_path / "weights")
