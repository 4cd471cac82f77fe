"""Exports pass against the ecosystem's own loaders: a fine-tuned classifier loads in
`transformers` as `*ForSequenceClassification` with megaloom's logits (fp32, 1e-4) and imports
back; a LoRA run's adapter loads with `peft` onto its exported base with megaloom's logits."""

import pytest
import torch
from finetune_helpers import make_trainer
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from megaloom.checkpoint.reader import LazyState, open_checkpoint
from megaloom.data.tokenizer import Tokenizer
from megaloom.finetune.peft_export import export_peft
from megaloom.interop import export_hf, load_hf_model
from megaloom.loading import load_model

TEXTS = ["alpha beta green", "stone river quick small omega", "cloud"]


def classifier_inputs(workdir):
    tokenizer = Tokenizer.from_file(workdir / "tokenizer.json")
    ids = [tokenizer.encode(t) for t in TEXTS]
    width = max(map(len, ids))
    tokens = torch.tensor([i + [tokenizer.eod_id] * (width - len(i)) for i in ids])
    return tokens, torch.tensor([len(i) - 1 for i in ids])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_classifier_exports_to_transformers_and_back(workdir, tmp_path, arch):
    trainer = make_trainer(workdir, tmp_path / "run", arch=arch, task="classify",
                           train="cls.jsonl", valid=None, max_steps=3)
    trainer.run()
    checkpoint = open_checkpoint(tmp_path / "run")
    export_hf(LazyState(checkpoint), checkpoint.config, tmp_path / "hf",
              tokenizer_path=checkpoint.tokenizer)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == {0: "green", 1: "river", 2: "stone"}
    ours, _, _ = load_model(tmp_path / "run")
    tokens, last = classifier_inputs(workdir)
    with torch.no_grad():
        want = ours(tokens)[torch.arange(len(TEXTS)), last]
        torch.testing.assert_close(hf(input_ids=tokens).logits, want, rtol=0, atol=1e-4)
        back, config, _ = load_hf_model(tmp_path / "hf")
        assert config.task.labels == ["green", "river", "stone"]
        torch.testing.assert_close(back(tokens), ours(tokens), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("arch", "task"), [("gpt2", "sft"), ("llama", "sft"),
                                            ("llama", "classify")])
def test_lora_adapter_loads_in_peft_with_equal_logits(workdir, tmp_path, arch, task):
    files = (dict(train="cls.jsonl", valid=None) if task == "classify"
             else dict(train="sft.jsonl", valid=None))
    make_trainer(workdir, tmp_path / "run", arch=arch, task=task, lora=4, max_steps=4,
                 **files).run()
    export_peft(tmp_path / "run", tmp_path / "adapter")
    loader = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    base = loader.from_pretrained(tmp_path / "adapter" / "base")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged, _, _ = load_model(tmp_path / "run")  # adapters folded into the weights
    tokens, last = classifier_inputs(workdir)
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens).logits
        ours = merged(tokens)
        if task == "classify":
            ours = ours[torch.arange(len(TEXTS)), last]
        else:
            ours = ours[..., :theirs.shape[-1]]
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=tokens).logits
        assert (theirs - plain).abs().max() > 1e-4  # the adapters matter
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
