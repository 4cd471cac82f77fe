"""The engine's greedy decode of a compressed model against argmax of full forwards."""

import torch

from megaloom.infer import Engine, Request, SamplingParams


def assert_engine_greedy_matches_recompute(model, vocab_size: int, prompt: list[int],
                                           count: int) -> None:
    [out] = Engine(model).generate([Request(prompt, SamplingParams(max_tokens=count,
                                                                   temperature=0.0))])
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(model(torch.tensor([ids]))[0, -1, :vocab_size].argmax()))
    assert out.completions[0].token_ids == ids[len(prompt):]
