"""OpenAI `POST /v1/chat/completions`.

Owns chat requests: messages rendered by the `ChatTemplate`, tokenised without special
tokens (the template writes the ones it wants), generated like a single-prompt completion,
answered as `chat.completion` (or streamed as `chat.completion.chunk` deltas, the first one
carrying the assistant role). Without `max_tokens`/`max_completion_tokens` the reply may use
the rest of the context. `logprobs=true` with `top_logprobs=k` reports each token as OpenAI's
chat API does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from megaloom.data.chat_template import ChatTemplateError
from megaloom.infer import TokenLogprob
from megaloom.serve.driver import Job
from megaloom.serve.errors import APIError
from megaloom.serve.generation import (
    CLIENT_GONE,
    ServeContext,
    finite,
    run_to_end,
    sse_response,
    usage,
)
from megaloom.serve.schemas import ChatRequest

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatRequest, request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctx
    ctx.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: only allowed with logprobs=true",
                       param="top_logprobs", code="invalid_value")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options: only allowed with stream=true",
                       param="stream_options", code="invalid_value")
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    try:
        prompt = ctx.tokenizer.encode(ctx.chat_template.render(messages))
    except ChatTemplateError as exc:
        raise APIError(400, f"messages: {exc}", param="messages",
                       code="chat_template_error") from None
    max_tokens = body.max_completion_tokens
    if max_tokens is None:
        max_tokens = body.max_tokens
    if max_tokens is None:
        max_tokens = max(ctx.driver.engine.room(len(prompt)), 1)
    if max_tokens == 0:
        raise APIError(400, "max_completion_tokens: must be at least 1",
                       param="max_completion_tokens", code="invalid_value")
    ctx.check_prompt(prompt, max_tokens, param="messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    job = ctx.submit([prompt], body.sampling_params(max_tokens, logprobs))
    reply = _Reply(ctx, body)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return sse_response(job, reply.stream(job, ctx.timeout, include_usage))
    outputs = await run_to_end(request, job, ctx.timeout)
    if outputs is None:
        return CLIENT_GONE
    choices = [{"index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": reply.logprobs(c.logprobs),
                "finish_reason": c.finish_reason}
               for c in outputs[0].completions]
    return JSONResponse({**reply.envelope("chat.completion", choices),
                         "usage": usage(outputs)})


class _Reply:
    def __init__(self, ctx: ServeContext, body: ChatRequest):
        self.ctx = ctx
        self.body = body
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.ctx.model_name, "choices": choices}

    async def stream(self, job: Job, timeout: float | None, include_usage: bool
                     ) -> AsyncIterator[dict[str, Any]]:
        for i in range(self.body.n or 1):
            yield self._chunk(i, {"role": "assistant", "content": ""}, None, None)
        async for _, event in job.events(timeout):
            logprob = [event.logprob] if self.body.logprobs and event.logprob else None
            if event.text or event.finish_reason or logprob:
                delta = {"content": event.text} if event.text else {}
                yield self._chunk(event.index, delta, event.finish_reason, logprob)
        if include_usage:
            yield {**self.envelope("chat.completion.chunk", []),
                   "usage": usage([o for o in job.outputs if o is not None])}

    def _chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None,
               logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": self.logprobs(logprobs),
                  "finish_reason": finish_reason}
        return self.envelope("chat.completion.chunk", [choice])

    def logprobs(self, entries: list[TokenLogprob | None] | None) -> dict[str, Any] | None:
        if not self.body.logprobs or entries is None:
            return None
        return {"content": [self._token(e, with_top=True) for e in entries if e is not None]}

    def _token(self, entry: TokenLogprob, with_top: bool = False) -> dict[str, Any]:
        text = self.ctx.token_text(entry.token_id)
        item: dict[str, Any] = {"token": text, "logprob": finite(entry.logprob),
                                "bytes": list(text.encode("utf-8"))}
        if with_top:
            item["top_logprobs"] = [self._token(TokenLogprob(t, lp)) for t, lp in entry.top]
        return item
