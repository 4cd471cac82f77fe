"""The official `openai` client against a live server: completions, chat, streaming, n > 1,
stop strings, compared with the engine run on the same request alone."""

from __future__ import annotations

import openai
import pytest

from megaloom.infer import Request, SamplingParams


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def alone(loaded, prompt, **params):
    """What the engine gives for this request by itself."""
    return loaded.engine(1).generate([Request(prompt, SamplingParams(**params))])[0]


def test_models_lists_the_served_model(oai, loaded):
    models = oai.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_greedy_completion_matches_engine(oai, loaded):
    result = oai.completions.create(model="tiny", prompt="The fox walks", max_tokens=12,
                                    temperature=0)
    expected = alone(loaded, "The fox walks", max_tokens=12, temperature=0.0)
    assert result.choices[0].text == expected.completions[0].text
    assert result.choices[0].finish_reason == expected.completions[0].finish_reason
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert result.usage.completion_tokens == len(expected.completions[0].token_ids)


def test_token_id_prompts_and_choice_order(oai, loaded):
    ids = [loaded.tokenizer.encode("A writer dreams of"), loaded.tokenizer.encode("The river")]
    result = oai.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0.7,
                                    n=2, seed=5, extra_body={"top_k": 20})
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(ids):
        expected = alone(loaded, prompt, max_tokens=6, temperature=0.7, n=2, seed=5, top_k=20)
        for i in range(2):
            assert result.choices[p * 2 + i].text == expected.completions[i].text


def test_stop_string_is_cut(oai, loaded):
    free = alone(loaded, "The old sailor", max_tokens=30, temperature=0.0).completions[0].text
    assert len(free) > 6
    stop = free[3:6]
    result = oai.completions.create(model="tiny", prompt="The old sailor", max_tokens=30,
                                    temperature=0, stop=[stop])
    choice = result.choices[0]
    assert choice.text == free[: free.index(stop)]
    assert choice.finish_reason == "stop"


def test_streaming_concatenates_to_the_full_text(oai, loaded):
    full = oai.completions.create(model="tiny", prompt="A small cat", max_tokens=20,
                                  temperature=0.9, seed=3, n=2)
    stream = oai.completions.create(model="tiny", prompt="A small cat", max_tokens=20,
                                    temperature=0.9, seed=3, n=2, stream=True,
                                    stream_options={"include_usage": True})
    texts, reasons, usage = ["", ""], [None, None], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.text for c in full.choices]
    assert reasons == [c.finish_reason for c in full.choices]
    assert usage == full.usage


def test_stream_never_leaks_part_of_a_stop_string(oai, loaded):
    free = alone(loaded, "My neighbour", max_tokens=30, temperature=0.0).completions[0].text
    stop = free[4:9]
    stream = oai.completions.create(model="tiny", prompt="My neighbour", max_tokens=30,
                                    temperature=0, stop=stop, stream=True)
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert "".join(pieces) == free[: free.index(stop)]


def test_chat_completion_and_stream(oai, loaded, server):
    messages = [{"role": "system", "content": "You write short lines."},
                {"role": "user", "content": "Write about the sea."}]
    prompt = server.app.state.ctx.chat_template.render(messages)
    assert prompt.endswith("Assistant:") and "User: Write about the sea." in prompt
    expected = alone(loaded, prompt, max_tokens=10, temperature=0.0).completions[0]
    result = oai.chat.completions.create(model="tiny", messages=messages,
                                         max_completion_tokens=10, temperature=0)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == expected.text
    stream = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                         temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="gpt-9", prompt="x", max_tokens=1)
    assert info.value.body["code"] == "model_not_found"
