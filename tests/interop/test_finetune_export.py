"""A model imported from HF, fine-tuned for a few AdamW steps in megaloom and exported, gives the
same loss in `transformers` as in megaloom."""

import pytest
import torch
from hf_reference import hf_model, tokens
from transformers import AutoModelForCausalLM

from megaloom.interop import export_hf, load_hf_model
from megaloom.model.gpt import lm_loss


@pytest.mark.parametrize("shape", ["gpt2-tied-padded", "llama-mqa-tied"])
def test_finetuned_model_exports_with_the_same_loss(tmp_path, shape):
    hf_model(shape, seed=9).save_pretrained(tmp_path / "hf")
    model, config, _ = load_hf_model(tmp_path / "hf")
    vocab = config.model.vocab_size
    batch = tokens(vocab, batch=4, seq=17, seed=10)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(5):
        loss = lm_loss(model(batch[:, :-1]), batch[:, 1:], vocab)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.all(model.embed.weight[vocab:] == 0)  # padding rows never learn

    export_hf(model, config, tmp_path / "tuned")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").eval()
    model.eval()
    with torch.no_grad():
        ours = lm_loss(model(batch[:, :-1]), batch[:, 1:], vocab)
        theirs = reference(batch, labels=batch).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
