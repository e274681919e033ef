"""What every request passes before a route: the body-size cap, the API key, one log line
and a count per request (pure ASGI middleware)."""

from __future__ import annotations

import hmac
import time
from typing import Callable

from fastapi.responses import JSONResponse

from charrnn.serve.metrics import Metrics
from charrnn.serve.schemas import APIError, Limits, error_body


class Gate:
    """Pure ASGI middleware: the body-size cap, the API key, one log line and a count per request."""

    OPEN = ("/", "/health")  # no key needed: the page asks for one, and a load balancer's probe

    def __init__(self, app, limits: Limits, api_key: str | None, metrics: Metrics, log: Callable[[str], None]):
        self.app, self.limits, self.api_key, self.metrics, self.log = app, limits, api_key, metrics, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path, status = scope["path"], [0]
        state = scope.setdefault("state", {})

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None:
                receive, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await refusal.response()(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except Exception as err:  # noqa: BLE001 -- Starlette re-raises what its handler has answered, for
            # the server to print a traceback; the handler logged it in one line, and that is enough
            if not status[0]:
                self.log(f"error: {type(err).__name__}: {err} ({scope['method']} {path})")
                await JSONResponse(error_body(f"internal error: {type(err).__name__}", "server_error"), 500)(
                    scope, receive, sending)
        finally:
            known = path if path in ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
                                     "/v1/score", "/openapi.json") \
                or path.startswith("/v1/models/") else "other"
            self.metrics.requests.labels("/v1/models/{name}" if known.startswith("/v1/models/") else known,
                                         str(status[0])).inc()
            chars = state.get("chars")
            self.log(f"{scope['method']} {path} {status[0]}"
                     f"{'' if chars is None else f' {chars} chars'} {time.perf_counter() - started:.3f} s")

    def _refusal(self, scope) -> APIError | None:
        if self.api_key is None or scope["path"] in self.OPEN:
            return None
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            return APIError(401, "missing or wrong API key: send Authorization: Bearer KEY", code="invalid_api_key")
        return None

    async def _read_body(self, scope, receive):
        """Read the whole body (up to max_body) and hand it on; a bigger one gets a 413."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive, None
        cap = self.limits.max_body
        length = dict(scope["headers"]).get(b"content-length")
        too_big = APIError(413, f"the request body is over {cap:,} bytes", code="body_too_large")
        if length is not None and length.isdigit() and int(length) > cap:
            return receive, too_big
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive, APIError(400, "the client went away while sending")
            body += message.get("body", b"")
            if len(body) > cap:
                return receive, too_big
            if not message.get("more_body"):
                break
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return replay, None
