"""Per-request sampling settings (`SamplingParams`) and their validation.

Owns only the values and the rules they must satisfy; how they act on logits lives in
`megaloom.infer.sampling`, and how stop conditions are matched in `megaloom.infer.stop`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from megaloom.errors import MegaloomError

MAX_SEED = 2**63 - 2**20  # draft i samples with seed + i; torch generators take 64-bit seeds


class SamplingError(MegaloomError):
    """An invalid request: a sampling value out of range, an empty or too long prompt."""


@dataclass
class SamplingParams:
    """How to continue one prompt.

    `temperature=0` is greedy decoding. `top_k=0` and `top_p=1` disable those filters.
    `repetition_penalty` (CTRL-style, 1 = off) acts on prompt and generated tokens;
    `presence_penalty` and `frequency_penalty` (OpenAI-style, 0 = off) on generated tokens.
    `stop` strings end a completion and are cut from its text; `stop_token_ids` (plus the
    tokenizer's end-of-document id unless `ignore_eos`) end it too. `n` drafts are sampled per
    prompt; draft `i` uses seed `seed + i` when a seed is given. `logprobs=k` reports the
    chosen token's log-probability and the `k` most likely alternatives; `echo` also reports
    the prompt's.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def validate(self) -> SamplingParams:
        """Raise `SamplingError` naming the first invalid field; return self."""
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 0, "max_tokens",
               self.max_tokens, "must be an integer >= 0")
        _check(self.temperature >= 0.0, "temperature", self.temperature, "must be >= 0")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", self.top_k,
               "must be an integer >= 0 (0 disables it)")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty,
               "must be > 0 (1 disables it)")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty,
               "must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               self.frequency_penalty, "must be in [-2, 2]")
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "must be an integer >= 1")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
               "logprobs", self.logprobs, "must be an integer >= 0")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "must be non-empty strings")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "must be token ids >= 0")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < MAX_SEED),
               "seed", self.seed, "must be an integer in [0, 2**63 - 2**20)")
        return self

    def for_vocabulary(self, vocab_size: int) -> SamplingParams:
        """These params checked against a model's vocabulary: `top_k` at or above it keeps
        every token (so it is 0, off); more alternatives or stop ids than it has are errors."""
        _check(self.logprobs is None or self.logprobs <= vocab_size, "logprobs", self.logprobs,
               f"must be <= the vocabulary size ({vocab_size})")
        _check(all(t < vocab_size for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, f"must be token ids below the vocabulary size ({vocab_size})")
        if self.top_k >= vocab_size:
            return replace(self, top_k=0)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise SamplingError(f"invalid {name}={value!r}: {rule}")
