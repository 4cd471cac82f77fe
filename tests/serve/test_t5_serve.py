"""An encoder-decoder behind the HTTP server: OpenAI completions and Megatron's `PUT /api`
answer with what the engine alone generates, and the length limits are the encoder's prompt
length and the decoder's output length."""

from __future__ import annotations

import pytest
import torch
from conftest import Loaded, live_server

from megaloom.checkpoint.files import save_model_files
from megaloom.config import Config, ModelConfig, TaskConfig
from megaloom.data.tokenizer import Tokenizer
from megaloom.infer import Request, SamplingParams
from megaloom.loading import load_model
from megaloom.model.t5 import T5


@pytest.fixture(scope="module")
def t5_loaded(checkpoint, tmp_path_factory) -> Loaded:
    tokenizer_path = checkpoint / "tokenizer.json"
    vocab = Tokenizer.from_file(tokenizer_path).vocab_size
    torch.manual_seed(0)
    config = ModelConfig(arch="t5", num_layers=2, hidden_size=32, num_heads=4, seq_len=24,
                         decoder_seq_len=12, vocab_size=vocab, dropout=0.0)
    model = T5(config)
    with torch.no_grad():  # large weights: outputs that depend on the prompt
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5)
    path = save_model_files(tmp_path_factory.mktemp("t5") / "model", model,
                            Config(model=config, task=TaskConfig(name="span")), tokenizer_path)
    loaded, _, tokenizer_path = load_model(path)
    return Loaded(loaded, Tokenizer.from_file(tokenizer_path), tokenizer_path)


def test_completions_and_megatron_api_match_the_engine(t5_loaded):
    prompts = ["the fox walks to", "a writer dreams of the quiet sea"]
    expected = [o.completions[0].text for o in t5_loaded.engine().generate(
        [Request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
         for p in prompts])]
    with live_server(t5_loaded) as live, live.client() as client:
        for prompt, text in zip(prompts, expected, strict=True):
            body = client.post("/v1/completions", json={
                "model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}).json()
            assert body["choices"][0]["text"] == text
        answer = client.put("/api", json={"prompts": prompts, "tokens_to_generate": 8,
                                          "top_k": 1, "stop_token": 299})
        assert answer.status_code == 200
        assert answer.json()["text"] == [p + t for p, t in zip(prompts, expected, strict=True)]


def test_limits_are_the_encoder_prompt_and_decoder_output(t5_loaded):
    with live_server(t5_loaded) as live, live.client() as client:
        too_many = client.post("/v1/completions", json={"prompt": "the fox", "max_tokens": 12})
        assert too_many.status_code == 400
        assert "writes up to 11" in too_many.json()["error"]["message"]
        fits = client.post("/v1/completions", json={"prompt": "the fox", "max_tokens": 11,
                                                     "ignore_eos": True})
        assert fits.status_code == 200
        assert fits.json()["usage"]["completion_tokens"] == 11
        long_prompt = client.post("/v1/completions", json={"prompt": list(range(25)),
                                                           "max_tokens": 1})
        assert long_prompt.status_code == 400
        assert "prompts of up to 24 tokens" in long_prompt.json()["error"]["message"]
