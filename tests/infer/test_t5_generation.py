"""Encoder-decoder generation: the engine's cached T5 decoding equals `transformers`'
`generate()` greedy token for token (v1.0 and v1.1 shapes, prompts of several lengths, more
prompts than cache slots), and sampling matches a full recompute of the decoder."""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import T5Config, T5ForConditionalGeneration  # noqa: E402

from megaloom.infer import Engine, Request, SamplingParams  # noqa: E402
from megaloom.infer.params import SamplingError  # noqa: E402
from megaloom.interop import load_hf_model  # noqa: E402

SHAPES = {
    "v1.0": dict(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 feed_forward_proj="relu"),
    "v1.1": dict(vocab_size=120, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
                 num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                 relative_attention_num_buckets=8, relative_attention_max_distance=12),
}
NEW_TOKENS = 16


@pytest.fixture(params=list(SHAPES), scope="module")
def pair(request, tmp_path_factory):
    """(HF reference, megaloom model) with large random weights (std 0.5, norm weights near
    1), so greedy outputs depend on the source and on the tokens decoded so far."""
    config = T5Config(**SHAPES[request.param], eos_token_id=None, decoder_start_token_id=0,
                      dropout_rate=0.0)
    reference = T5ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in reference.parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if param.dim() == 1 else 0.5 * noise)
    directory = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(directory)
    model, _, _ = load_hf_model(directory)
    return reference, model


def prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(2, vocab, (n,), generator=generator).tolist() for n in (7, 12, 12, 3, 9)]


def test_greedy_equals_transformers_generate(pair):
    reference, model = pair
    vocab = model.config.vocab_size
    engine = Engine(model, max_batch_size=3)  # five prompts through three slots
    outputs = engine.generate([Request(p, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
                               for p in prompts(vocab)])
    distinct = set()
    for prompt, output in zip(prompts(vocab), outputs, strict=True):
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=False)
        ours = output.completions[0].token_ids
        assert ours == theirs[0, 1:].tolist()
        distinct.update(ours)
    assert len(distinct) > 4  # not a degenerate repetition of one token


@torch.no_grad()
def test_sampling_matches_full_recompute(pair):
    """Each sampled token is drawn from the teacher-forced forward's distribution: the cached
    decoder's logits at every step equal the uncached forward's."""
    _, model = pair
    prompt = prompts(model.config.vocab_size)[1]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3, logprobs=0)
    (output,) = Engine(model, max_batch_size=2).generate([Request(prompt, params)])
    tokens = output.completions[0].token_ids
    decoder = torch.tensor([[model.config.decoder_start_id, *tokens[:-1]]])
    logits = model(torch.tensor([prompt]), decoder)[0, :, : model.config.vocab_size]
    expected = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(tokens)), tokens]
    got = torch.tensor([lp.logprob for lp in output.completions[0].logprobs])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_echo_is_refused_for_encoder_decoder(pair):
    _, model = pair
    with pytest.raises(SamplingError, match="decoder-only"):
        Engine(model).add_request(Request([5, 6, 7], SamplingParams(echo=True, max_tokens=2)))
