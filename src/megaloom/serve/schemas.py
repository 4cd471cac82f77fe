"""Request bodies of every route, as strict pydantic models.

Owns the field names, types and ranges the server accepts. Models are strict (no "5" for 5,
no true for 1) and forbid unknown fields, so a field the server would not honour is refused
with a 400 naming it instead of being silently ignored. `null` means "the default" for the
optional OpenAI fields, as OpenAI clients send it. Rules that tie fields together (max_tokens
0 only with echo, ...) are checked by the routes, which also know the model's limits.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from megaloom.infer import SamplingParams
from megaloom.infer.params import MAX_SEED


def _unicode(value: str) -> str:
    """Text that UTF-8 can carry: JSON admits lone surrogates (`"\\ud800"`), tokenizers do not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone surrogate (invalid Unicode); send valid UTF-8 text"
                         ) from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED - 1)]

NonNegInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TokenIds = list[NonNegInt]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """What completions and chat share: the model name and how to sample."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    top_p: Probability | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: Text | list[Text] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    ignore_eos: bool = False

    def sampling_params(self, max_tokens: int, logprobs: int | None = None,
                        echo: bool = False) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            n=self.n or 1, stop=stop, seed=self.seed, logprobs=logprobs, echo=echo,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            ignore_eos=self.ignore_eos)


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    max_tokens: NonNegInt | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: NonNegInt | None = None
    max_completion_tokens: NonNegInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: Text
    add_special_tokens: bool = False


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: TokenIds


class MegatronRequest(Strict):
    """Megatron-LM's `PUT /api` body (text generation server), with its ranges."""

    prompts: Annotated[list[Annotated[Text, Field(min_length=1)]],
                       Field(min_length=1, max_length=128)]
    tokens_to_generate: NonNegInt = 64
    logprobs: bool = False
    temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=1000)] = 0
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    random_seed: Seed | None = None
    stop_token: NonNegInt | None = None
    add_BOS: bool = False  # noqa: N815 (Megatron's field name)
