"""Engine correctness against direct, uncached forward passes of the same model."""

from __future__ import annotations

import pytest
import torch

from megaloom.infer import Engine, Request, SamplingError, SamplingParams

VOCAB = 320


def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every step (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1, :VOCAB]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("packed_head", [True, False])
def test_kv_cached_greedy_equals_full_recompute(make_model, arch, packed_head):
    model = make_model(arch)
    prompt = [5, 17, 99, 3, 250, 42]
    engine = Engine(model, max_batch_size=2, packed_head=packed_head)
    [out] = engine.generate([Request(prompt, greedy(64))])
    assert out.completions[0].token_ids == reference_greedy(model, prompt, 64)
    assert out.completions[0].finish_reason == "length"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_mixed_lengths_equal_each_alone(make_model, arch):
    """More prompts than slots, different lengths and budgets: sequences join and leave the
    batch at different steps (continuous batching) and must not disturb each other."""
    model = make_model(arch)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 11, 1, 7, 20, 7)]
    budgets = [12, 5, 20, 9, 3, 15]
    requests = [Request(p, greedy(b)) for p, b in zip(prompts, budgets, strict=True)]
    batched = Engine(model, max_batch_size=3).generate(requests)
    for prompt, budget, out in zip(prompts, budgets, batched, strict=True):
        [alone] = Engine(model, max_batch_size=1).generate([Request(prompt, greedy(budget))])
        assert out.completions[0].token_ids == alone.completions[0].token_ids
        assert out.completions[0].token_ids == reference_greedy(model, prompt, budget)


def test_requests_join_a_running_batch(make_model):
    model = make_model("llama")
    engine = Engine(model, max_batch_size=4)
    first = engine.add_request(Request([1, 2, 3], greedy(10)))
    for _ in range(4):
        engine.step()
    second = engine.add_request(Request([9, 8, 7, 6], greedy(6)))
    while engine.has_unfinished():
        engine.step()
    assert first.output.completions[0].token_ids == reference_greedy(model, [1, 2, 3], 10)
    assert second.output.completions[0].token_ids == reference_greedy(model, [9, 8, 7, 6], 6)


def test_logprobs_equal_log_softmax_of_direct_forward(make_model):
    model = make_model("gpt2")
    prompt = [4, 8, 15, 16, 23, 42]
    params = SamplingParams(max_tokens=5, temperature=0.7, seed=3, logprobs=3, echo=True)
    [out] = Engine(model).generate([Request(prompt, params)])
    completion = out.completions[0]
    ids = prompt + completion.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0, :, :VOCAB].float(), dim=-1)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(ids)):
        entry = (out.prompt_logprobs[pos] if pos < len(prompt)
                 else completion.logprobs[pos - len(prompt)])
        assert entry.token_id == ids[pos]
        assert entry.logprob == pytest.approx(logp[pos - 1, ids[pos]].item(), abs=1e-4)
        top_values, top_ids = logp[pos - 1].topk(3)
        assert [t for t, _ in entry.top] == top_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top_values.tolist(), abs=1e-4)


def test_same_seed_same_sample_regardless_of_batch(make_model):
    model = make_model("llama")
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    [alone] = Engine(model).generate([Request([1, 2, 3], params)])
    others = [Request([7] * k, SamplingParams(max_tokens=20, seed=k)) for k in (2, 5)]
    batch = Engine(model).generate(others + [Request([1, 2, 3], params)])
    assert batch[-1].completions[0].token_ids == alone.completions[0].token_ids
    other_seed = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=99)
    [different] = Engine(model).generate([Request([1, 2, 3], other_seed)])
    assert different.completions[0].token_ids != alone.completions[0].token_ids


def test_top_k_one_equals_greedy(make_model):
    model = make_model("gpt2")
    [sampled] = Engine(model).generate(
        [Request([3, 1, 4, 1, 5], SamplingParams(max_tokens=30, temperature=1.3, top_k=1))])
    assert sampled.completions[0].token_ids == reference_greedy(model, [3, 1, 4, 1, 5], 30)


def test_n_drafts_use_distinct_seeds(make_model):
    model = make_model("gpt2")
    params = SamplingParams(max_tokens=15, n=3, seed=10)
    [out] = Engine(model).generate([Request([1, 2], params)])
    drafts = [c.token_ids for c in out.completions]
    assert len({tuple(d) for d in drafts}) == 3
    single = SamplingParams(max_tokens=15, seed=11)
    [one] = Engine(model).generate([Request([1, 2], single)])
    assert one.completions[0].token_ids == drafts[1]


def test_stop_token_ids_and_eod(make_model, tokenizer):
    model = make_model("gpt2")
    reference = reference_greedy(model, [10, 11, 12], 20)
    stop = reference[6]
    first = reference.index(stop)
    [out] = Engine(model).generate([Request([10, 11, 12], greedy(20, stop_token_ids=[stop]))])
    assert out.completions[0].token_ids == reference[: first + 1]
    assert out.completions[0].finish_reason == "stop"


def test_cancel_finishes_request(make_model):
    model = make_model("gpt2")
    engine = Engine(model, max_batch_size=2)
    keep = engine.add_request(Request([1, 2, 3], greedy(8)))
    drop = engine.add_request(Request([4, 5], greedy(50)))
    engine.step()
    drop.cancel()
    while engine.has_unfinished():
        engine.step()
    assert drop.output.completions[0].finish_reason == "cancelled"
    assert keep.output.completions[0].token_ids == reference_greedy(model, [1, 2, 3], 8)


def test_streaming_events_rebuild_the_text(make_model, tokenizer):
    model = make_model("gpt2", vocab_size=tokenizer.vocab_size)
    seen: list[str] = []
    params = SamplingParams(max_tokens=25, seed=0, ignore_eos=True)
    [out] = Engine(model, tokenizer).generate(
        [Request("The quick", params, on_event=lambda e: seen.append(e.text))])
    completion = out.completions[0]
    assert "".join(seen) == completion.text
    assert completion.text == tokenizer.decode(completion.token_ids)


def test_context_limit_finishes_with_length(make_model):
    model = make_model("gpt2", seq_len=16)
    [out] = Engine(model).generate([Request(list(range(10)), greedy(50))])
    assert len(out.completions[0].token_ids) == 6
    assert out.completions[0].finish_reason == "length"


@pytest.mark.parametrize(("prompt", "params", "message"), [
    ([], SamplingParams(), "empty prompt"),
    (list(range(129)), SamplingParams(), "longer than the model's context"),
    ([1, 999], SamplingParams(), "outside the vocabulary"),
    ([1], SamplingParams(temperature=-0.5), "temperature"),
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(top_p=1.5), "top_p"),
    ([1], SamplingParams(top_k=-1), "top_k"),
    ([1], SamplingParams(max_tokens=-1), "max_tokens"),
    ([1], SamplingParams(n=0), "invalid n"),
    ([1], SamplingParams(stop=["x"]), "need a tokenizer"),
    ("text", SamplingParams(), "need a tokenizer"),
])
def test_invalid_requests_are_rejected(make_model, prompt, params, message):
    engine = Engine(make_model("gpt2"))
    with pytest.raises(SamplingError, match=message):
        engine.add_request(Request(prompt, params))
    assert not engine.has_unfinished()


def test_max_tokens_zero_with_echo_scores_the_prompt(make_model):
    model = make_model("llama")
    [out] = Engine(model).generate(
        [Request([3, 4, 5], SamplingParams(max_tokens=0, echo=True, logprobs=0))])
    assert out.completions[0].token_ids == []
    assert out.completions[0].finish_reason == "length"
    assert [e and e.token_id for e in out.prompt_logprobs] == [None, 4, 5]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.accelerator.is_available(), reason="needs an accelerator")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_accelerator_batched_greedy_matches_uncached(make_model, arch):
    device = torch.accelerator.current_accelerator()
    model = make_model(arch).to(device)
    prompts = [[5, 17, 99], [1, 2, 3, 4, 5, 6, 7], [42]]
    outs = Engine(model, max_batch_size=2).generate([Request(p, greedy(32)) for p in prompts])
    for prompt, out in zip(prompts, outs, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(32):
                ids.append(int(model(torch.tensor([ids], device=device))[0, -1, :VOCAB].argmax()))
        assert out.completions[0].token_ids == ids[len(prompt):]
