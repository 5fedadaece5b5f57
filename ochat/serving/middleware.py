"""ASGI middleware in front of the routes: API keys (constant-time comparison).

Pure ASGI classes, not BaseHTTPMiddleware, which would sit between streaming responses and disconnects."""

from __future__ import annotations

import hmac

from ochat.serving.errors import error_response
from ochat.serving.metrics import ServerMetrics

OPEN_PATHS = ("/health",)           # plus the web UI: "/" and "/ui/*"


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path == "/" or path.startswith("/ui/")


class ApiKeyAuth:
    """Requests must carry `Authorization: Bearer KEY` with one of `keys` (when any are set); /health
    and the web page are open, and so are CORS preflights (OPTIONS)."""

    def __init__(self, app, keys: list[str], metrics: ServerMetrics):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.metrics = metrics

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        token = header[7:].strip() if header[:7].lower() == b"bearer " else b""
        ok = False
        for k in self.keys:     # compare with every key: the time does not reveal which one matched
            ok |= hmac.compare_digest(token, k)
        return ok

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and self.keys and scope["method"] != "OPTIONS"
                and not is_open_path(scope["path"]) and not self._authorized(scope)):
            self.metrics.error(401)
            response = error_response(401, "Invalid or missing API key (send 'Authorization: Bearer KEY')",
                                      code="invalid_api_key")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
