"""`ochat chat`: talk to a model in the terminal.

`--model DIR` starts the real OpenAI-compatible server in this process (on a free loopback port) and
talks to it; `--api-base URL` talks to a running `ochat serve` (or any OpenAI-compatible server).
Replies stream in as Markdown (rich). A line ending with `\\` continues on the next line.
Ctrl-C stops the current reply (the HTTP stream is closed, so the server aborts the request).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from ochat.errors import OchatError
from ochat.templates.conversation import Conversation, conversation_from_openai, parse_conversation
from ochat.utils.atomic import atomic_write_text

COMMANDS_HELP = ("!!exit  leave (or Ctrl-D) · !!reset  start over · !!regen  answer the last message again · "
                 "!!save FILE · !!load FILE · a line ending with \\ continues · Ctrl-C stops a reply")


class ChatSession:
    """The conversation so far plus how to ask the server for the next reply."""

    def __init__(self, client, model: str, system: str, condition: str | None, sampling: dict[str, Any],
                 console: Console, markdown: bool, debug: bool, encoder=None):
        self.client = client
        self.model = model
        self.system = system
        self.condition = condition
        self.sampling = sampling
        self.console = console
        self.markdown = markdown
        self.debug = debug
        self.encoder = encoder          # ConversationEncoder for --debug token listings (in-process only)
        self.messages: list[dict[str, str]] = []

    # ----- commands -----

    def reset(self) -> None:
        self.messages = []

    def save(self, path: str) -> None:
        conv = {"items": self.messages, "condition": self.condition or "", "system": self.system}
        atomic_write_text(path, json.dumps(conv, ensure_ascii=False, indent=2) + "\n")

    def load(self, path: str) -> None:
        p = Path(path).expanduser()
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise OchatError(f"{p}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OchatError(f"{p}: not a JSON file ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("messages"), list):   # OpenAI request body
            conv = conversation_from_openai(data["messages"], condition=data.get("condition", ""))
        else:
            conv = parse_conversation(data, where=str(p))
        self.messages = [{"role": m.role, "content": m.content} for m in conv.items]
        self.system = conv.system
        if conv.condition:
            self.condition = conv.condition

    # ----- generation -----

    def request_messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def print_prompt_tokens(self) -> None:
        if self.encoder is None:
            self.console.print("[dim]prompt tokens: listed only with --model DIR (the count follows the reply)[/dim]")
            return
        conv: Conversation = conversation_from_openai(self.request_messages())
        ids, _ = self.encoder.encode_one(conv, inference=True, condition=self.condition)
        pieces = self.encoder.tokenizer.convert_ids_to_tokens(ids)
        self.console.print(Text(f"prompt ({len(ids)} tokens): " + " ".join(f"{p}:{i}" for p, i in zip(pieces, ids)),
                                style="dim"))

    def stream_reply(self) -> None:
        """Ask for the next assistant message and stream it to the terminal; Ctrl-C stops it."""
        if self.debug:
            self.print_prompt_tokens()
        extra = {"condition": self.condition} if self.condition else None
        start = time.perf_counter()
        first = last = None
        text, usage, finish, stopped, stream, chunks = "", None, None, False, None, 0
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=self.request_messages(), stream=True,
                stream_options={"include_usage": True}, extra_body=extra, **self.sampling)
            self.console.print("[bold green]Assistant:[/bold green]")
            with self._live() as show:
                for chunk in stream:
                    if chunk.usage:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            last = time.perf_counter()
                            first = first or last
                            text += choice.delta.content
                            chunks += 1
                            show(text)
                        finish = choice.finish_reason or finish
        except KeyboardInterrupt:
            stopped = True
        except Exception as e:  # the server's own message, e.g. 400 prompt too long, 401 bad key
            if stream is None:
                raise OchatError(_api_error(e)) from None
            self.console.print(Text(f"error: {_api_error(e)}", style="red"))
            stopped = True
        finally:
            if stream is not None:
                stream.close()   # closes the connection: the server aborts the request and frees its slot
        if text:
            self.messages.append({"role": "assistant", "content": text})
        if stopped:
            self.console.print("[yellow]\\[stopped][/yellow]")
        elif finish == "length":
            self.console.print("[yellow]\\[cut at max tokens][/yellow]")
        if self.debug:
            n = usage.completion_tokens if usage else chunks   # a stopped stream has no usage chunk
            rate = f"{(n - 1) / (last - first):.1f} tokens/s" if n and n > 1 and last and last > first else "n/a tokens/s"
            ttft = f"first token {1000 * (first - start):.0f} ms" if first else "no tokens"
            counts = [f"{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated"] if usage else []
            self.console.print(Text("[" + "; ".join([*counts, ttft, rate]) + "]", style="dim"))

    @contextlib.contextmanager
    def _live(self) -> Iterator:
        if self.markdown and self.console.is_terminal:
            reply = _LiveMarkdown()
            with Live(reply, console=self.console, refresh_per_second=10, vertical_overflow="visible"):
                yield reply.set
        else:   # plain text: print only what is new
            shown = [0]

            def show(text: str) -> None:
                self.console.out(text[shown[0]:], end="", highlight=False)
                shown[0] = len(text)
            yield show
            if shown[0]:
                self.console.out("")


class _LiveMarkdown:
    """The reply so far, parsed as Markdown only when rich redraws (10 times a second), not per token."""

    def __init__(self) -> None:
        self.text = ""

    def set(self, text: str) -> None:
        self.text = text

    def __rich_console__(self, console, options):
        yield Markdown(self.text)


def _api_error(e: Exception) -> str:
    """The server's message from an openai exception (OpenAI error shape), or the exception itself."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            status = getattr(e, "status_code", None)
            return f"{status} {err.get('type', '')}: {err['message']}" if status else err["message"]
    return f"{type(e).__name__}: {e}"


def read_message(console: Console) -> str:
    """One user message; a line ending with a backslash continues on the next line."""
    lines = []
    prompt = "You: "
    while True:
        line = console.input(f"[bold blue]{prompt}[/bold blue]" if console.is_terminal else prompt)
        if line.endswith("\\"):
            lines.append(line[:-1])
            prompt = "...  "
            continue
        lines.append(line)
        return "\n".join(lines)


def run_chat(session: ChatSession) -> None:
    console = session.console
    console.print(f"[dim]chatting with {session.model}"
                  + (f" (condition: {session.condition})" if session.condition else "") + f". {COMMANDS_HELP}[/dim]")
    while True:
        try:
            text = read_message(console)
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-C clears the line; !!exit or Ctrl-D leaves)[/dim]")
            continue
        except EOFError:
            console.print()
            return
        command, _, arg = text.strip().partition(" ")
        arg = arg.strip()
        try:
            if command == "!!exit":
                return
            if command == "!!reset":
                session.reset()
                console.print("[dim]conversation reset[/dim]")
            elif command == "!!regen":
                while session.messages and session.messages[-1]["role"] == "assistant":
                    session.messages.pop()
                if not session.messages:
                    console.print("[dim]nothing to regenerate[/dim]")
                    continue
                session.stream_reply()
            elif command in ("!!save", "!!load"):
                if not arg:
                    console.print(f"[red]usage: {command} FILE[/red]")
                elif command == "!!save":
                    session.save(arg)
                    console.print(f"[dim]saved {len(session.messages)} messages to {arg}[/dim]")
                else:
                    session.load(arg)
                    console.print(f"[dim]loaded {len(session.messages)} messages from {arg}[/dim]")
                    for m in session.messages:
                        console.print(Text(f"{m['role']}: {m['content']}", style="dim"))
            elif command.startswith("!!"):
                console.print(f"[dim]{COMMANDS_HELP}[/dim]")
            elif text.strip():
                session.messages.append({"role": "user", "content": text})
                try:
                    session.stream_reply()
                except OchatError:
                    session.messages.pop()   # not answered: the user can fix the problem and send again
                    raise
        except OchatError as e:
            console.print(Text(f"error: {e}", style="red"))
        except KeyboardInterrupt:   # Ctrl-C outside the reply stream (e.g. while --debug lists tokens)
            console.print("[yellow]\\[stopped][/yellow]")


def chat(
    model: Optional[str] = typer.Option(None, "--model", help="A model directory (served in this process), or "
                                        "with --api-base the served model name (default: the server's first)."),
    api_base: Optional[str] = typer.Option(None, "--api-base", help="A running server, e.g. http://localhost:18888/v1"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OCHAT_API_KEY", help="Bearer key for --api-base."),
    model_type: Optional[str] = typer.Option(None, "--model-type", help="Model type for --model DIR (default: ochat.json)."),
    system: str = typer.Option("", "--system", help="System prompt."),
    condition: Optional[str] = typer.Option(None, "--condition", help="C-RLFT condition, e.g. 'GPT4 Correct', 'Code'."),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0),
    max_tokens: int = typer.Option(512, "--max-tokens", min=1),
    seed: Optional[int] = typer.Option(None, "--seed"),
    markdown: bool = typer.Option(True, "--markdown/--plain", help="Render replies as Markdown (terminals only)."),
    debug: bool = typer.Option(False, "--debug", help="Print the prompt tokens and tokens/s of each reply."),
) -> None:
    """Chat with a model in the terminal (streaming, Markdown, !!commands)."""
    console = Console(highlight=False)
    sampling: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
    if seed is not None:
        sampling["seed"] = seed
    from ochat.serving.inprocess import endpoint

    local = model if api_base is None else None
    serve_options = {"model_type": model_type} if model_type else {}
    with contextlib.ExitStack() as stack:
        with console.status(f"loading {local} ...") if local else contextlib.nullcontext():
            api_base, served = stack.enter_context(endpoint(local, api_base, None if local else model,
                                                            name_required=False, **serve_options))
        encoder = _local_encoder(Path(local).expanduser(), model_type) if local and debug else None
        import openai

        client = openai.OpenAI(base_url=api_base, api_key=api_key or "EMPTY", max_retries=0, timeout=600)
        if served is None:
            try:
                served = client.models.list().data[0].id
            except openai.APIConnectionError:
                raise OchatError(f"--api-base {api_base}: cannot connect") from None
            except openai.APIStatusError as e:
                raise OchatError(f"--api-base {api_base}: {_api_error(e)}") from None
        session = ChatSession(client, served, system, condition, sampling, console, markdown, debug, encoder)
        run_chat(session)


def _local_encoder(model_dir: Path, model_type: str | None):
    from ochat.models.model_dir import ModelDir

    model = ModelDir(model_dir, "--model", model_type)
    return model.encoder() if model.model_type_name else None
