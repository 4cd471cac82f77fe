"""Request guards: the API key and the request-body size limit, as plain ASGI middleware.

Owns `ApiKeyMiddleware` (every route but `/health` needs the key when one is set; it is
accepted as `Authorization: Bearer KEY`, as the password of HTTP Basic auth so a browser can
open the web page, or as `X-API-Key`; compared in constant time) and `BodyLimitMiddleware`
(413 when `Content-Length` or the bytes actually received exceed the limit). Pure ASGI, so
streaming responses and client-disconnect detection pass through untouched.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from megaloom.serve.errors import error_response

OPEN_PATHS = frozenset({"/health"})
BROWSER_PATHS = ("/web/",)


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        browser = path == "/" or path.startswith(BROWSER_PATHS)
        challenge = 'Basic realm="megaloom"' if browser else "Bearer"
        response = error_response(401, "missing or invalid API key (send 'Authorization: "
                                  "Bearer KEY')", code="invalid_api_key",
                                  headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer":
            given = value.strip()
        elif scheme.lower() == b"basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                given = None
        return given is not None and hmac.compare_digest(given, self.key)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"request body is larger than the limit of {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, self.message, code="body_too_large")
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            # A chunked body over the limit: FastAPI re-raises HTTP exceptions from body
            # reading, and the app's handler renders this one as a 413.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.message)
            return message

        await self.app(scope, limited_receive, send)
