"""T5 text-to-text fine-tuning (`megaloom finetune --task sft` on an encoder-decoder): the
prompt is the source and the response the target; the run's ROUGE equals `megaloom evaluate
--task generate` on the same data, and the exported model generates the same tokens in
`transformers`."""

import json

import torch
from finetune_helpers import sft_records, write_jsonl

from megaloom.cli import main


def test_t5_summarisation_finetune_evaluate_and_export(workdir, tmp_path):
    valid = tmp_path / "valid.jsonl"
    write_jsonl(valid, [{**r, "reference": r["response"]} for r in sft_records(6, seed=2)])
    out = tmp_path / "t5-sft"
    assert main(["finetune", str(workdir / "base-t5"), "--task", "sft", "--data",
                 str(workdir / "sft.jsonl"), "--valid", str(valid), "--out", str(out),
                 "train.micro_batch_size=4", "train.global_batch_size=8", "task.epochs=30",
                 "train.lr=3e-3", "train.warmup_steps=5", "task.eval_samples=6",
                 "task.max_new_tokens=8"]) == 0
    report = json.loads((out / "eval.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text()
              .splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0] - 1.0  # the copy task is being learned
    assert report["trained_tokens"] > 0 and len(report["generations"]) == 6
    scored = tmp_path / "scored.json"
    assert main(["evaluate", str(out), "--task", "generate", "--data", str(valid), "--greedy",
                 "--max-tokens", "8", "--json", str(scored)]) == 0
    evaluated = json.loads(scored.read_text())
    generations = [g["generation"] for g in report["generations"]]
    assert evaluated["rouge"]["rouge1"]["f1"] == report["rouge"]["rouge1"]["f1"]
    assert main(["convert", "megaloom-to-hf", str(out), str(tmp_path / "hf")]) == 0

    from transformers import AutoTokenizer, T5ForConditionalGeneration

    reference = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for record, ours in zip(sft_records(6, seed=2), generations, strict=True):
        ids = torch.tensor([tokenizer.encode(record["prompt"])[-24:]])  # the encoder's length
        theirs = reference.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False,
                                    eos_token_id=tokenizer.eos_token_id)
        assert tokenizer.decode(theirs[0, 1:], skip_special_tokens=True).strip() == ours
