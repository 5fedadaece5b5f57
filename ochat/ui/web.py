"""The web chat page, served by `ochat serve` at `/` next to the OpenAI-compatible API.

A static page (ochat/ui/static) that calls the same-origin `/v1` API from the browser; the browser
libraries (marked, DOMPurify, highlight.js) are vendored under static/vendor, so nothing is built at
install time and nothing is fetched from a CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

# Defence in depth behind DOMPurify: even if model output slipped through, no inline script, no
# third-party fetch (e.g. an <img> exfiltrating the conversation) and no framing of the page.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _StaticFiles(StaticFiles):
    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_web_ui(app: FastAPI) -> None:
    """Serve the chat page at `GET /` and its assets under `/ui/` (no API key needed for either)."""

    @app.get("/", include_in_schema=False)
    def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=SECURITY_HEADERS)

    app.mount("/ui", _StaticFiles(directory=STATIC_DIR), name="ui")
