"""Fine-tuning on the one trainer: gradient accumulation k x b equals one micro-batch of k*b
(across an epoch boundary), resume is exact, LoRA starts at the base model's logits, trains
only its adapters, and its merged checkpoint equals the unmerged model."""

import torch
from finetune_helpers import make_trainer

from megaloom.loading import load_model
from megaloom.train.metrics import read_metrics


def test_accumulation_equals_one_large_micro_batch(workdir, tmp_path):
    # 24 samples pack into an odd number of rows, so step 3 wraps into a reshuffled epoch.
    runs = {}
    for micro in (1, 4):
        trainer = make_trainer(workdir, tmp_path / f"m{micro}", micro=micro, global_batch=4,
                               max_steps=5)
        trainer.model.train()
        grads = {}
        for step in (0, 3):  # step 3 holds the last rows of epoch 0 and the first of epoch 1
            trainer.optimizer.zero_grad()
            trainer.loss_and_gradients(trainer.micro_batches(step), 1.0)
            grads[step] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        losses = [trainer.train_step()["loss"] for _ in range(5)]
        runs[micro] = losses, grads
    assert len(make_trainer(workdir, tmp_path / "x").train_data) % 4 != 0
    torch.testing.assert_close(runs[1][0], runs[4][0], rtol=1e-6, atol=1e-6)
    for step, grads in runs[4][1].items():
        for name, value in grads.items():
            torch.testing.assert_close(runs[1][1][step][name], value, rtol=1e-5, atol=1e-6,
                                       msg=f"step {step} {name}")


def test_resume_continues_exactly(workdir, tmp_path):
    make_trainer(workdir, tmp_path / "straight", task="classify", train="cls.jsonl",
                 valid="cls_valid.jsonl", lora=4, max_steps=6).run()
    make_trainer(workdir, tmp_path / "resumed", task="classify", train="cls.jsonl",
                 valid="cls_valid.jsonl", lora=4, max_steps=6, exit_at_step=3).run()
    make_trainer(workdir, tmp_path / "resumed", task="classify", train="cls.jsonl",
                 valid="cls_valid.jsonl", lora=4, max_steps=6).run()
    want = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    got = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(want, got, strict=True):
        assert a["loss"] == b["loss"] and a.get("val_loss") == b.get("val_loss")


def test_lora_starts_at_the_base_trains_adapters_and_merges_exactly(workdir, tmp_path):
    base, _, _ = load_model(workdir / "base-llama")
    trainer = make_trainer(workdir, tmp_path / "lora", arch="llama", lora=4, max_steps=6,
                           train="chat.jsonl", valid=None)
    tokens = torch.randint(0, 300, (2, 12))
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(tokens), base(tokens), rtol=0, atol=0)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainer.optimizer.params) == len(trainable) == 4 * 5 * 2
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if not p.requires_grad}
    result = trainer.run()
    assert all(torch.equal(frozen[n], p) for n, p in trainer.model.named_parameters()
               if n in frozen)
    assert any(p.abs().max() > 0 for n, p in trainer.model.named_parameters()
               if n.endswith("lora_B"))
    merged, _, _ = load_model(result.checkpoint)
    trainer.model.eval()
    with torch.no_grad():
        unmerged = trainer.model(tokens)
        assert (unmerged - base(tokens)).abs().max() > 1e-3  # the adapters changed the model
        torch.testing.assert_close(merged(tokens), unmerged, rtol=1e-5, atol=1e-5)
