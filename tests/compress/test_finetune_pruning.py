"""`train.pruning` in `megaloom finetune`: the fine-tuned weights reach the target sparsity."""

import json

import pytest

from megaloom.cli import main
from megaloom.loading import load_model
from megaloom.train.metrics import read_metrics


def test_finetune_prunes_on_schedule(checkpoint, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the red fox {i}",
                                        "response": "walks to the long road."}) + "\n"
                            for i in range(40)))
    out = tmp_path / "run"
    assert main(["finetune", str(checkpoint / "dense"), "--task", "sft", "--data", str(data),
                 "--out", str(out), "train.pruning.sparsity=0.5", "train.pruning.start_step=1",
                 "train.pruning.interval=2", "task.epochs=2", "train.micro_batch_size=4",
                 "train.global_batch_size=4"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    model, _, _ = load_model(out)
    for name, param in model.named_parameters():
        if name.endswith(("qkv.weight", "down.weight")):
            assert int((param == 0).sum()) == round(0.5 * param.numel()), name
