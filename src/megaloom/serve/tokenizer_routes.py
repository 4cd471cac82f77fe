"""`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info` (vLLM's shapes).

Owns the routes that let clients and evaluation harnesses use the server's tokenizer instead
of their own. `/tokenize` encodes like `/v1/completions` does (no special tokens added unless
`add_special_tokens`), and the text of a special token maps to its id.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import DataError
from megaloom.serve.generation import ServeContext
from megaloom.serve.schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    ctx: ServeContext = request.app.state.ctx
    ctx.check_model(body.model)
    tokens = ctx.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": ctx.max_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    ctx: ServeContext = request.app.state.ctx
    ctx.check_model(body.model)
    if body.tokens:
        ctx.check_prompt(body.tokens, 0, param="tokens")
    return {"prompt": ctx.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    ctx: ServeContext = request.app.state.ctx
    return {"tokenizer_class": "megaloom.Tokenizer (Hugging Face tokenizers)",
            "eos_token": eos_token_of(ctx.tokenizer), "bos_token": ctx.chat_template.bos_token,
            "model_max_length": ctx.max_len, "vocab_size": ctx.tokenizer.vocab_size,
            "chat_template": ctx.chat_template.source}


def eos_token_of(tokenizer: Tokenizer) -> str | None:
    try:
        return tokenizer.eod_token
    except DataError:
        return None
