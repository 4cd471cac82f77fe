"""OpenAI-style error responses for every failure the server reports.

Owns `APIError` (raised by route code) and `install_error_handlers`, which turns it, FastAPI's
validation errors (422 by default, here 400), Starlette's HTTP errors (404, 405, ...) and
unexpected exceptions into `{"error": {"message", "type", "param", "code"}}` with a real
status code. Nothing here knows about generation.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_exceeded", 503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """An error to send to the client: status, message and the OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _TYPES.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return APIError(status, message, param, code, headers=headers).response()


def validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic error of a request body as a 400 naming the top-level field."""
    errors = exc.errors()
    # Text that is not valid Unicode fails every member of a union: that is the reason to give.
    errors = [e for e in errors if "lone surrogate" in str(e.get("msg"))] or errors
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if "lone surrogate" in str(first.get("msg")):
        loc = [str(part) for part in first.get("loc", ())  # without union member tags
               if part != "body" and "[" not in str(part)]
        return APIError(400, f"{'.'.join(loc)}: {first['msg'].removeprefix('Value error, ')}",
                        param=loc[0] if loc else None, code="invalid_unicode")
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"invalid JSON body: {detail}".rstrip(": "), code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not loc and kind in ("model_attributes_type", "dict_type", "missing"):
        return APIError(400, "the request body must be a JSON object (Content-Type: "
                        "application/json)", code="invalid_body")
    param = loc[0] if loc else None
    where = ".".join(loc)
    if param in UNION_RULES and len(loc) > 1 and not loc[1].isdigit():
        # A value that fits none of a union's forms: say which forms are accepted.
        return APIError(400, f"{param}: {UNION_RULES[param]}", param=param, code="invalid_type")
    if kind == "extra_forbidden":
        message = "unsupported field"
    elif kind == "missing":
        message = "field required"
    else:
        message = first.get("msg", "invalid value")
        if "input" in first and loc:
            message = f"{message} (got {_short(first['input'])})"
    return APIError(400, f"{where}: {message}" if where else message, param=param, code=kind)


UNION_RULES = {
    "prompt": "must be a string, a list of strings, a list of token ids (integers >= 0) or "
              "a list of token-id lists",
    "stop": "must be a string or a list of strings",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return APIError(exc.status_code, message, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return APIError(500, f"internal server error: {type(exc).__name__}",
                        type_="server_error").response()
