"""The server side of the web chat: its page at `/`, next to the OpenAI-compatible API.

A static page (ochat/ui/static) that calls the same-origin `/v1` API from the browser; the browser
libraries (marked, DOMPurify, highlight.js) are vendored under static/vendor, so nothing is built at
install time and nothing is fetched from a CDN.

With several models the page can compare two side by side; the user's votes go to `POST /v1/votes`
(an ochat extension, API key required like /v1), appended to `--votes-file` (ochat.serving.votes)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ochat.serving.errors import APIError
from ochat.serving.openapi import body, responses
from ochat.serving.validation import parse_request
from ochat.serving.votes import append_vote, vote_record

# The page itself lives with the other user interfaces; this module is its server side.
STATIC_DIR = Path(__file__).resolve().parents[1] / "ui" / "static"

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


class VoteRequest(BaseModel):
    model_1: str
    model_2: str
    winner: Literal["model_1", "model_2", "tie"]
    messages: list[dict] = Field(default_factory=list, max_length=1000)
    answer_1: str = ""
    answer_2: str = ""


class VoteResponse(BaseModel):
    id: str
    object: Literal["vote"] = "vote"
    winner: Literal["model_1", "model_2", "tie"]
    model_1: str
    model_2: str


def mount_votes(app: FastAPI, config) -> None:
    """`GET /v1/votes` says whether votes are kept; `POST /v1/votes` appends one to `config.votes_file`."""
    votes_file = getattr(config, "votes_file", None)

    @app.get("/v1/votes", responses=responses(401, 403))
    async def votes_enabled():
        return {"enabled": votes_file is not None}

    @app.post("/v1/votes", **body(VoteRequest, VoteResponse))
    async def add_vote(request: Request):
        if votes_file is None:
            raise APIError(404, "this server keeps no votes (start it with --votes-file FILE)", code="votes_disabled")
        req = await parse_request(request, VoteRequest, config)
        models = request.app.state.models
        name_1, name_2 = models.resolve(req.model_1).name, models.resolve(req.model_2).name
        if name_1 == name_2:
            raise APIError(400, "model_1 and model_2 must be two different models", param="model_2")
        record = vote_record(name_1, name_2, req.winner, req.messages, req.answer_1, req.answer_2)
        append_vote(votes_file, record)
        return {"id": record["id"], "object": "vote", "winner": req.winner, "model_1": name_1, "model_2": name_2}


def mount_web_ui(app: FastAPI, config) -> None:
    """Serve the chat page at `GET /` and its assets under `/ui/` (no API key needed for either), and the
    compare view's votes under /v1/votes (`config`: the server's ServeConfig)."""
    mount_votes(app, config)

    @app.get("/", include_in_schema=False)
    def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=SECURITY_HEADERS)

    app.mount("/ui", _StaticFiles(directory=STATIC_DIR), name="ui")
