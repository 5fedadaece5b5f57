"""uvicorn, configured for a server that faces untrusted clients: a time limit on each request's headers
(slow clients cannot hold connections open), a cap on open connections (beyond it a new connection is
answered 503 and closed), both answered with OpenAI-shaped errors. Used by `ochat serve` and `start_server`."""

from __future__ import annotations

import json
import socket
import sys

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from ochat.serving.served_model import ServeConfig

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
KEEP_ALIVE_S = 5


def _raw_error(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\nretry-after: 1\r\n\r\n").encode() + body


class GuardedHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol (httptools or h11) with a header timeout and a connection cap."""

    header_timeout_s: float = 10.0
    max_connections: int = 1024

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_raw_error(503, "Service Unavailable", f"too many open connections (at most "
                                       f"{self.max_connections}, --max-connections); retry", "too_many_connections"))
            transport.close()
            return
        self._expect_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_headers()          # the next request on this keep-alive connection

    def _expect_headers(self) -> None:
        self.loop.call_later(self.header_timeout_s, self._headers_timed_out, self.cycle)

    def _headers_timed_out(self, cycle_then) -> None:
        # No new request's headers arrived since the timer started: the cycle is the same object.
        if self.cycle is cycle_then and not self.transport.is_closing():
            if cycle_then is None or cycle_then.response_complete:
                self.transport.write(_raw_error(408, "Request Timeout", f"the request headers did not arrive "
                                                f"within {self.header_timeout_s:g} s", "header_timeout"))
                self.transport.close()


def protocol_for(config: ServeConfig) -> type:
    return type("GuardedHTTPProtocol", (GuardedHTTPProtocol,),
                {"header_timeout_s": config.header_timeout_s, "max_connections": config.max_connections})


def uvicorn_config(app, config: ServeConfig, **kw) -> uvicorn.Config:
    return uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                          lifespan="on", http=protocol_for(config), timeout_keep_alive=KEEP_ALIVE_S,
                          timeout_graceful_shutdown=int(config.shutdown_timeout_s), **kw)


def serve_forever(app, config: ServeConfig) -> None:
    uvicorn.Server(uvicorn_config(app, config)).run()


def warn_if_exposed(config: ServeConfig) -> None:
    """Binding a non-loopback address without API keys lets anyone on the network use the model."""
    if not config.api_keys and config.host not in LOOPBACK_HOSTS and not config.host.startswith("127."):
        print(f"ochat: WARNING: listening on {config.host} without API keys: anyone who can reach this "
              f"address can use the server (give --api-keys KEY)", file=sys.stderr, flush=True)


def bind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
