"""What every generating route shares: the served model's context, prompt checks, running a
job to its end while watching the client, and server-sent events.

Owns `ServeContext` (driver, tokenizer, names and limits, stored on `app.state.ctx`),
`check_prompt`, `run_to_end` (cancels the generation when the client disconnects) and
`sse_events` (formats chunks as `data: {json}`, reports a failure after the 200 in-band and
always ends with `data: [DONE]`, cancelling the generation if the client goes away).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from megaloom.data.chat_template import ChatTemplate
from megaloom.data.tokenizer import Tokenizer
from megaloom.infer import RequestOutput, SamplingError, SamplingParams
from megaloom.serve.driver import EngineDriver, Job
from megaloom.serve.errors import APIError


@dataclass
class ServeContext:
    """The served model and the server's limits, shared by all routes."""

    driver: EngineDriver
    tokenizer: Tokenizer
    model_name: str
    chat_template: ChatTemplate
    timeout: float | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def max_len(self) -> int:
        return self.driver.engine.max_len

    @property
    def vocab_size(self) -> int:
        return self.driver.engine.vocab_size

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")

    def token_text(self, token_id: int) -> str:
        """The text of one token (byte-level pieces of a character decode to U+FFFD)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def check_prompt(self, ids: Sequence[int], max_tokens: int, param: str = "prompt") -> None:
        """400 for an empty prompt, ids outside the vocabulary or a context overflow."""
        if not ids:
            raise APIError(400, f"{param}: empty prompt; give at least one token", param=param,
                           code="empty_prompt")
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary "
                           f"[0, {self.vocab_size})", param=param, code="invalid_token_id")
        engine = self.driver.engine
        if max_tokens > engine.room(len(ids)) and engine.runner.offset(len(ids)) == len(ids):
            raise APIError(400, f"this model's maximum context length is {self.max_len} tokens, "
                           f"but the request asks for {len(ids) + max_tokens} ({len(ids)} in "
                           f"the prompt, {max_tokens} to generate); shorten the prompt or "
                           "lower max_tokens", param=param, code="context_length_exceeded")
        if max_tokens > engine.room(len(ids)):
            raise APIError(400, f"this encoder-decoder reads prompts of up to "
                           f"{engine.runner.max_prompt} tokens and writes up to "
                           f"{engine.room(1)}; the request has {len(ids)} in the prompt and "
                           f"asks for {max_tokens} to generate", param=param,
                           code="context_length_exceeded")

    def submit(self, prompts: Sequence[list[int]], params: SamplingParams) -> Job:
        try:
            params.validate()
        except SamplingError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None
        return self.driver.submit(prompts, params)


NEG_INF = -9999.0
"""What -inf (and NaN) log-probabilities are sent as: JSON has no infinity."""


def finite(logprob: float) -> float:
    return NEG_INF if math.isinf(logprob) or math.isnan(logprob) else logprob


def usage(outputs: Sequence[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.completions)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


async def run_to_end(request: Request, job: Job, timeout: float | None
                     ) -> list[RequestOutput] | None:
    """Wait for a job; None (and the job cancelled) if the client disconnected first."""
    waiting = asyncio.ensure_future(job.wait(timeout))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not waiting.done():
            waiting.cancel()
            job.cancel()
    return waiting.result() if waiting.done() and not waiting.cancelled() else None


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


CLIENT_GONE = Response(status_code=499)
"""Returned when the client left before the answer: nobody reads it."""


def sse_response(job: Job, chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    return StreamingResponse(sse_events(job, chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def sse_events(job: Job, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        job.cancel()  # no-op when finished; the client left or the stream failed otherwise
    yield "data: [DONE]\n\n"
