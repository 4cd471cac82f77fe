"""Megatron-LM's text generation API: `PUT /api`.

Owns Megatron's request fields and response (`text`: prompt plus generation, `segments`: the
token strings, `logprobs`: one per token after the first). Every accepted field is honoured:
`top_p` 0 means off (Megatron's default) and may not be combined with `top_k`;
`tokens_to_generate` 0 needs `logprobs` (scoring); `stop_token` replaces the end-of-document
token as the id that ends generation; `add_BOS` prepends the tokenizer's BOS token (its
end-of-document token when it has none, as Megatron's GPT-2 tokenizer does). Errors are
OpenAI-shaped with real status codes, not Megatron's plain strings with HTTP 200.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from megaloom.infer import SamplingParams
from megaloom.serve.errors import APIError
from megaloom.serve.generation import CLIENT_GONE, ServeContext, finite, run_to_end
from megaloom.serve.schemas import MegatronRequest
from megaloom.serve.tokenizer_routes import eos_token_of

router = APIRouter()


@router.put("/api")
async def megatron_generate(body: MegatronRequest, request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctx
    if body.tokens_to_generate == 0 and not body.logprobs:
        raise APIError(400, "tokens_to_generate: 0 is only allowed with logprobs=true",
                       param="tokens_to_generate", code="invalid_value")
    if body.top_k > 0 and body.top_p > 0:
        raise APIError(400, "top_p: cannot be set together with top_k", param="top_p",
                       code="invalid_value")
    prefix = [_bos_id(ctx)] if body.add_BOS else []
    prompts = [prefix + ctx.tokenizer.encode(p) for p in body.prompts]
    for ids in prompts:
        ctx.check_prompt(ids, body.tokens_to_generate, param="prompts")
    params = SamplingParams(
        max_tokens=body.tokens_to_generate, temperature=body.temperature, top_k=body.top_k,
        top_p=body.top_p if body.top_p > 0 else 1.0, seed=body.random_seed,
        logprobs=0 if body.logprobs else None, echo=body.logprobs,
        stop_token_ids=[] if body.stop_token is None else [body.stop_token],
        ignore_eos=body.stop_token is not None)
    if body.stop_token is not None and body.stop_token >= ctx.vocab_size:
        raise APIError(400, f"stop_token: {body.stop_token} is outside the vocabulary "
                       f"[0, {ctx.vocab_size})", param="stop_token", code="invalid_token_id")
    outputs = await run_to_end(request, ctx.submit(prompts, params), ctx.timeout)
    if outputs is None:
        return CLIENT_GONE
    result: dict[str, Any] = {"text": [], "segments": []}
    if body.logprobs:
        result["logprobs"] = []
    for output in outputs:
        completion = output.completions[0]
        ids = output.prompt_token_ids + completion.token_ids
        result["text"].append(ctx.tokenizer.decode(output.prompt_token_ids)
                              + (completion.text or ""))
        result["segments"].append([ctx.token_text(t) for t in ids])
        if body.logprobs:
            entries = (output.prompt_logprobs or [None])[1:] + (completion.logprobs or [])
            result["logprobs"].append([finite(e.logprob) for e in entries if e is not None])
    return JSONResponse(result)


def _bos_id(ctx: ServeContext) -> int:
    for token in (ctx.chat_template.bos_token, eos_token_of(ctx.tokenizer)):
        token_id = ctx.tokenizer.token_to_id(token) if token else None
        if token_id is not None:
            return token_id
    raise APIError(400, "add_BOS: the tokenizer has no BOS or end-of-document token",
                   param="add_BOS", code="invalid_value")
