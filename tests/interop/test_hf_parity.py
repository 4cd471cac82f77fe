"""Logit and greedy-generation parity with `transformers`, in both directions, for GPT-2 and
Llama shapes (grouped-query and multi-query attention, tied/untied heads, padded vocabularies).
"""

import pytest
import torch
from hf_reference import greedy, hf_model, megaloom_config, randomize_, tokens
from transformers import AutoModelForCausalLM

from megaloom.interop import export_hf, load_hf_model
from megaloom.model.gpt import GPT

ATOL = 1e-4


def test_import_logits_match_transformers(tmp_path, shape):
    reference = hf_model(shape)
    reference.save_pretrained(tmp_path)
    model, config, tokenizer = load_hf_model(tmp_path)
    model.eval()
    want = megaloom_config(shape)
    for field in ("arch", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
                  "ffn_hidden_size", "seq_len", "vocab_size", "norm_eps", "rope_theta",
                  "activation", "tie_embeddings"):
        assert getattr(config.model, field) == getattr(want, field), field
    assert tokenizer is None
    assert model.embed.weight.shape[0] == config.model.padded_vocab_size
    assert torch.all(model.embed.weight[config.model.vocab_size:] == 0)
    assert (model.lm_head.weight is model.embed.weight) == config.model.tie_embeddings
    ids = tokens(config.model.vocab_size)
    with torch.no_grad():
        ours = model(ids)[..., : config.model.vocab_size]
        theirs = reference(ids).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_export_logits_match_transformers(tmp_path, shape):
    config = megaloom_config(shape)
    model = randomize_(GPT(config), seed=3).eval()
    export_hf(model, config, tmp_path / "hf")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert reference.config.vocab_size == config.vocab_size
    ids = tokens(config.vocab_size, seed=4)
    with torch.no_grad():
        ours = model(ids)[..., : config.vocab_size]
        theirs = reference(ids).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(tmp_path, shape):
    reference = hf_model(shape, seed=5)
    reference.save_pretrained(tmp_path)
    model, config, _ = load_hf_model(tmp_path)
    prompt = tokens(config.model.vocab_size, batch=1, seq=6, seed=6)
    with torch.no_grad():
        theirs = reference.generate(prompt, attention_mask=torch.ones_like(prompt),
                                    max_new_tokens=32, do_sample=False, pad_token_id=0)
    ours = greedy(model.eval(), prompt, 32, config.model.vocab_size)
    assert theirs.shape == (1, 6 + 32)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("shape", ["gpt2-tied-padded", "llama-gqa-untied"])
def test_kv_cached_engine_on_hf_dir_matches_transformers(tmp_path, shape):
    """What `megaloom generate hf:DIR` runs: `load_model("hf:DIR")` and the KV-cached engine,
    two prompts of different lengths batched together."""
    from megaloom.infer.engine import Engine, Request
    from megaloom.infer.params import SamplingParams
    from megaloom.loading import load_model

    reference = hf_model(shape, seed=12)
    reference.save_pretrained(tmp_path)
    model, config, _ = load_model(f"hf:{tmp_path}")
    prompts = [tokens(config.model.vocab_size, 1, seq, seed=seq)[0].tolist() for seq in (5, 9)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outputs = Engine(model).generate([Request(prompt=p, params=params) for p in prompts])
    for prompt, output in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=32,
                                        do_sample=False, pad_token_id=0)
        assert output.completions[0].token_ids == theirs[0, len(prompt):].tolist()


def test_base_model_checkpoint_with_legacy_buffers_loads(tmp_path):
    """Hub GPT-2 files come from `GPT2Model`: names lack `transformer.` and older ones carry
    the causal-mask buffers `h.N.attn.bias` / `h.N.attn.masked_bias`."""
    from safetensors.torch import load_file, save_file

    reference = hf_model("gpt2-tied-padded", seed=13)
    reference.transformer.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert not any(name.startswith("transformer.") for name in weights)
    for i in range(2):
        weights[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        weights[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, config, _ = load_hf_model(tmp_path)
    ids = tokens(config.model.vocab_size, seed=14)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids)[..., : config.model.vocab_size],
                                   reference(ids).logits, atol=ATOL, rtol=0)
