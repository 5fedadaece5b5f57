"""ASGI middleware in front of the routes: the checks every request passes before any route runs.

- Host (without API keys only): a web page the user visits must not reach the server through DNS
  rebinding, so the Host header must be a loopback name, an IP address, `--host` or one of `--allowed-hosts`.
- Content-Type: POST bodies are `application/json` (415 otherwise); a cross-site form or a `text/plain`
  fetch, which browsers send without asking, is refused.
- API keys (when set): `Authorization: Bearer KEY`, compared in constant time; /health and the web page are open.

A pure ASGI class, not BaseHTTPMiddleware, which would sit between streaming responses and disconnects."""

from __future__ import annotations

import hmac
import ipaddress

from ochat.serving.errors import error_response
from ochat.serving.metrics import ServerMetrics
from ochat.serving.served_model import ServeConfig

OPEN_PATHS = ("/health",)           # plus the web UI: "/" and "/ui/*"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path == "/" or path.startswith("/ui/")


def host_name(host_header: str) -> str:
    """'example.com:8000' -> 'example.com', '[::1]:80' -> '::1' (lower case, no trailing dot)."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.split(":")[0]
    return h.rstrip(".")


def is_safe_host(name: str, allowed: set[str]) -> bool:
    """A Host that DNS rebinding cannot produce: an IP literal, a loopback name or an allowed name."""
    if "*" in allowed or name in allowed or name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class RequestGuard:
    def __init__(self, app, config: ServeConfig, metrics: ServerMetrics):
        self.app = app
        self.keys = [k.encode() for k in config.api_keys]
        self.allowed_hosts = {host_name(h) for h in config.allowed_hosts} | {host_name(config.host)}
        self.metrics = metrics

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        header = headers.get(b"authorization", b"")
        token = header[7:].strip() if header[:7].lower() == b"bearer " else b""
        ok = False
        for k in self.keys:     # compare with every key: the time does not reveal which one matched
            ok |= hmac.compare_digest(token, k)
        return ok

    def _refusal(self, scope):
        """The error response for a request that may not reach the routes, else None."""
        headers = dict(scope["headers"])
        if not self.keys and b"host" in headers:
            name = host_name(headers[b"host"].decode("latin-1"))
            if not is_safe_host(name, self.allowed_hosts):
                return error_response(403, f"Host '{name[:100]}' is not allowed: without API keys only loopback "
                                           f"names, IP addresses and --allowed-hosts are served (DNS rebinding)",
                                      param="Host", code="host_not_allowed")
        if scope["method"] == "OPTIONS":
            return None
        if scope["method"] == "POST":
            media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media_type != b"application/json":
                return error_response(415, "POST bodies must be JSON: send 'Content-Type: application/json'",
                                      param="Content-Type", code="unsupported_media_type")
        if self.keys and not is_open_path(scope["path"]) and not self._authorized(headers):
            return error_response(401, "Invalid or missing API key (send 'Authorization: Bearer KEY')",
                                  code="invalid_api_key")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                self.metrics.error(refusal.status_code)
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
