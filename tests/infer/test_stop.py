"""Stop strings across token boundaries, held-back streaming and incomplete UTF-8."""

from __future__ import annotations

from megaloom.infer import Engine, Request, SamplingParams
from megaloom.infer.stop import TextStream


class CharTokenizer:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def feed(stream: TextStream, text: str) -> list[str]:
    deltas = []
    for ch in text:
        deltas.append(stream.add(ord(ch)))
        if stream.stopped:
            break
    return deltas


def test_stop_string_split_over_tokens_is_cut_and_never_streamed():
    stream = TextStream(CharTokenizer(), [ord("x")], ["END"])
    deltas = feed(stream, "abcENDxyz")
    assert stream.stopped and stream.text == "abc"
    assert "".join(deltas) == "abc"
    assert deltas[3:] == ["", "", ""]  # "E", "EN" held back, then the stop: nothing released


def test_false_stop_prefix_is_released_later():
    stream = TextStream(CharTokenizer(), [ord("x")], ["END", "STOP"])
    deltas = feed(stream, "abENx")
    assert not stream.stopped
    assert deltas == ["a", "b", "", "", "ENx"]
    stream.add(ord("S"))
    assert stream.finish() == "S"  # no more tokens: the held prefix is just text


def test_incomplete_utf8_is_held_until_complete(tokenizer):
    text = "Café naïve résumé 日本語"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some token is a partial char
    stream = TextStream(tokenizer, [], [])
    deltas = [stream.add(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_engine_cuts_stop_string_spanning_token_boundary(tokenizer, make_model):
    model = make_model("gpt2", vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    base = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    [ref] = engine.generate([Request("The quick", base)])
    ids, text = ref.completions[0].token_ids, ref.completions[0].text
    boundary = next(len(tokenizer.decode(ids[:k])) for k in range(3, len(ids))
                    if 2 <= len(tokenizer.decode(ids[:k])) <= len(text) - 2
                    and len(tokenizer.decode(ids[k:k + 1])) >= 1)
    stop = text[boundary - 2: boundary + 2]
    with_stop = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])
    streamed: list[str] = []
    [out] = engine.generate([Request("The quick", with_stop,
                                     on_event=lambda e: streamed.append(e.text))])
    assert out.completions[0].finish_reason == "stop"
    assert out.completions[0].text == text[: text.find(stop)]
    assert "".join(streamed) == out.completions[0].text
