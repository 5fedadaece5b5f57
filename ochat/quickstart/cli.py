"""`ochat quickstart`: the whole loop on a CPU in a few minutes, then a chat with the result.

corpus -> data pipeline (C-RLFT condition map) -> tiny Mistral-architecture model -> C-RLFT training
-> held-out exact-match accuracy -> `ochat serve` with the web chat (unless --no-serve).
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ochat.synthetic.quickstart_corpus import CorpusConfig

DEFAULTS = CorpusConfig()


def quickstart(
    out: Path = typer.Option(Path("ochat-quickstart"), "--out", help="Where everything is written (re-runs reuse finished stages)."),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Serve the trained model with the web chat at the end."),
    seed: int = typer.Option(0, "--seed", help="Seed of the corpus, the model and the training."),
    steps: int = typer.Option(700, "--steps", min=1, help="Training steps (optimiser updates)."),
    conversations: int = typer.Option(DEFAULTS.conversations, "--conversations", min=10, help="Training conversations in the corpus."),
    test_questions: int = typer.Option(DEFAULTS.test_questions, "--test-questions", min=3, help="Held-out questions."),
    hidden_size: int = typer.Option(128, "--hidden-size", min=16, help="Model width."),
    layers: int = typer.Option(2, "--layers", min=1, help="Transformer layers."),
    batch_max_len: int = typer.Option(1024, "--batch-max-len", min=64, help="Tokens per packed training row (one row per step)."),
    lr: float = typer.Option(3e-3, "--lr", min=0.0, help="Peak learning rate."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface the server binds."),
    port: int = typer.Option(18888, "--port", help="Server port."),
    serve_seconds: float = typer.Option(None, "--serve-seconds", help="Stop serving after this many seconds (default: until Ctrl-C)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
) -> None:
    """Train a tiny chat model with C-RLFT on a mixed-quality corpus, measure it, and chat with it."""
    from ochat.quickstart.stages import QuickstartConfig, run_quickstart, say

    t0 = time.perf_counter()
    corpus = CorpusConfig(conversations=conversations, test_questions=test_questions, seed=seed)
    cfg = QuickstartConfig(out=out, seed=seed, corpus=corpus, hidden_size=hidden_size, layers=layers, steps=steps,
                           batch_max_len=batch_max_len, lr=lr, progress=progress)
    r = run_quickstart(cfg, serve=serve)
    checkpoint = r["train"]["checkpoint"]
    say(f"\nquickstart finished in {time.perf_counter() - t0:.0f}s; everything is in {out.resolve()}:\n"
        f"  corpus (ShareGPT pages + JSON dump, held-out test)  {r['corpus']['dir']}\n"
        f"  pre-tokenized data (Parquet, text, report)          {Path(r['data']['prefix']).parent}\n"
        f"  base model (random init)                            {r['model']['dir']}\n"
        f"  trained model (HF format)                           {checkpoint}\n"
        f"  training metrics                                    {r['train']['metrics']}\n"
        f"  accuracy per task and examples                      {r['accuracy']['file']}\n"
        f"  stage markers (delete one to redo that stage)       {out / '.stages'}")
    if serve:
        serve_model(Path(checkpoint), host, port, serve_seconds)


def serve_model(checkpoint: Path, host: str, port: int, seconds: float | None) -> None:
    from ochat.quickstart.stages import say
    from ochat.serving.inprocess import start_server

    say(f"[6/6] serving {checkpoint} ...")
    server = start_server(str(checkpoint), host=host, port=port)
    name = server.model_name
    say(f"""
Chat with your model:
  browser:  {server.root_url}/
  curl:     curl {server.base_url}/chat/completions -H 'Content-Type: application/json' -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "What is 4 + 7?"}}]}}'
  python:   import openai
            client = openai.OpenAI(base_url="{server.base_url}", api_key="EMPTY")
            print(client.chat.completions.create(model="{name}", messages=[{{"role": "user", "content": "What is the capital of Australia?"}}]).choices[0].message.content)
(same model from the command line: ochat serve --model {checkpoint} --port {port})
""" + ("Press Ctrl-C to stop." if seconds is None else f"Stopping after {seconds:g}s."))
    try:
        deadline = None if seconds is None else time.monotonic() + seconds
        while server.thread.is_alive() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.2)
    except KeyboardInterrupt:
        say("stopping the server")
    finally:
        server.stop()
