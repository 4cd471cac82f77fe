"""OpenAI `POST /v1/completions` and `GET /v1/models`.

Owns turning a completion request into engine requests (one per prompt, `n` drafts each;
token-id prompts used exactly as given) and the engine's output back into OpenAI's response
and stream chunks: choice index = prompt index x n + draft, `echo` prepends the prompt (and
its logprobs, the first one null), `logprobs=k` reports each token with the chosen and the
`k` most likely alternatives (-inf sent as -9999.0). `text_offset` counts characters from
the start of the choice's `text`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from megaloom.infer import Event, RequestOutput, TokenLogprob
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
from megaloom.serve.schemas import CompletionRequest

router = APIRouter()

@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    ctx: ServeContext = request.app.state.ctx
    return {"object": "list", "data": [{"id": ctx.model_name, "object": "model",
                                        "created": ctx.created, "owned_by": "megaloom",
                                        "max_model_len": ctx.max_len}]}


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctx
    ctx.check_model(body.model)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens: 0 is only allowed with echo=true (scoring a prompt)",
                       param="max_tokens", code="invalid_value")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options: only allowed with stream=true",
                       param="stream_options", code="invalid_value")
    prompts = _prompt_ids(ctx, body.prompt)
    for ids in prompts:
        ctx.check_prompt(ids, max_tokens)
    params = body.sampling_params(max_tokens, body.logprobs, body.echo)
    job = ctx.submit(prompts, params)
    builder = _Choices(ctx, body, prompts)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return sse_response(job, builder.stream(job, ctx.timeout, include_usage))
    outputs = await run_to_end(request, job, ctx.timeout)
    if outputs is None:
        return CLIENT_GONE
    return JSONResponse(builder.response(outputs))


def _prompt_ids(ctx: ServeContext, prompt: str | list) -> list[list[int]]:
    """Normalise the four prompt forms to token-id lists (text is encoded without specials)."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt: empty list; give at least one prompt", param="prompt",
                       code="empty_prompt")
    return [ctx.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]


class _Choices:
    """Builds choices, logprobs and stream chunks of one completion request."""

    def __init__(self, ctx: ServeContext, body: CompletionRequest, prompts: list[list[int]]):
        self.ctx = ctx
        self.body = body
        self.prompts = prompts
        self.n = body.n or 1
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_texts = [ctx.tokenizer.decode(ids) if body.echo else "" for ids in prompts]

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.ctx.model_name, "choices": choices}

    def response(self, outputs: Sequence[RequestOutput]) -> dict[str, Any]:
        choices = []
        for p, output in enumerate(outputs):
            for completion in output.completions:
                entries = list(completion.logprobs or [])
                ids = list(completion.token_ids)
                if self.body.echo:
                    entries = list(output.prompt_logprobs or []) + entries
                    ids = output.prompt_token_ids + ids
                choices.append({
                    "index": p * self.n + completion.index,
                    "text": self.prompt_texts[p] + (completion.text or ""),
                    "logprobs": self._logprobs(ids, entries, 0),
                    "finish_reason": completion.finish_reason,
                })
        result = self._envelope(choices)
        result["usage"] = usage(outputs)
        return result

    async def stream(self, job: Job, timeout: float | None, include_usage: bool
                     ) -> AsyncIterator[dict[str, Any]]:
        offsets = [0] * (len(self.prompts) * self.n)
        echoed: set[int] = set()
        async for p, event in job.events(timeout):
            if self.body.echo and p not in echoed:
                # The prompt's logprobs exist once its prefill ran, i.e. at its first event.
                echoed.add(p)
                for chunk in self._echo_chunks(p, job.outputs[p], offsets):
                    yield chunk
            index = p * self.n + event.index
            if not (event.text or event.finish_reason or self._wants_logprobs(event)):
                continue
            choice = self._chunk_choice(index, event.text, event.finish_reason)
            if self._wants_logprobs(event):
                choice["logprobs"] = self._logprobs([event.token_id], [event.logprob],
                                                    offsets[index])
            offsets[index] += len(event.text)
            yield self._envelope([choice])
        if include_usage:
            chunk = self._envelope([])
            chunk["usage"] = usage([o for o in job.outputs if o is not None])
            yield chunk

    def _echo_chunks(self, p: int, output: RequestOutput | None, offsets: list[int]
                     ) -> list[dict[str, Any]]:
        chunks = []
        for i in range(self.n):
            index = p * self.n + i
            choice = self._chunk_choice(index, self.prompt_texts[p], None)
            if self.body.logprobs is not None and output is not None:
                choice["logprobs"] = self._logprobs(self.prompts[p],
                                                    output.prompt_logprobs or [], 0)
            offsets[index] = len(self.prompt_texts[p])
            chunks.append(self._envelope([choice]))
        return chunks

    def _wants_logprobs(self, event: Event) -> bool:
        return self.body.logprobs is not None and event.token_id is not None

    @staticmethod
    def _chunk_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _logprobs(self, ids: Sequence[int], entries: Sequence[TokenLogprob | None],
                  offset: int) -> dict[str, Any] | None:
        if self.body.logprobs is None:
            return None
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token_id, entry in zip(ids, entries, strict=True):
            text = self.ctx.token_text(token_id)
            tokens.append(text)
            text_offset.append(offset)
            offset += len(text)
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(finite(entry.logprob))
            top_logprobs.append(top_dict(self.ctx, entry))
        return {"tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs, "text_offset": text_offset}


def top_dict(ctx: ServeContext, entry: TokenLogprob) -> dict[str, float]:
    """The alternatives as {token text: logprob}, most likely first, the chosen one included
    (different ids with the same text keep the higher value)."""
    top: dict[str, float] = {}
    for token_id, logprob in [*entry.top, (entry.token_id, entry.logprob)]:
        top.setdefault(ctx.token_text(token_id), finite(logprob))
    return top
