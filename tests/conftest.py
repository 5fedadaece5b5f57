"""Shared fixtures: a real tokenizer (mistral-common), tiny models made by ochat, the shared data."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("OCHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHARED_DATA = Path(os.environ.get("OCHAT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (set OCHAT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def _mistral_tokenizer():
    from ochat.models.tokenizers import load_mistral_tokenizer

    return load_mistral_tokenizer()


@pytest.fixture()
def mistral_tokenizer(_mistral_tokenizer):
    """A fresh copy of the Mistral-7B tokenizer (no end-of-turn token yet)."""
    return copy.deepcopy(_mistral_tokenizer)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Mistral model with the real Mistral tokenizer, model type openchat_3.5."""
    from ochat.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-openchat_3.5", "mistral-common",
                           "openchat_3.5", arch="mistral", hidden_size=64, layers=2, heads=4)


@pytest.fixture(scope="session")
def bytelevel_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (the StarCoder / Llama-3 kind) trained here on a small text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [
        "Hello there! How are you? I am fine, thank you.", "Write code:\n```python\nprint(1)\n```",
        "Sure, here it is:\n\n    x = 1\n", "The quick brown fox jumps over the lazy dog. 2+2=4",
        "def add(a, b):\n    return a + b\n", "Be nice. You are a helpful assistant.",
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("tok") / "bytelevel"
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Playwright. Both are test dependencies (the README's test command installs
    them): a missing one fails the browser tests rather than skipping them. Module scope: Playwright's sync
    API keeps an event loop running in this thread while it is open, which `asyncio.run` elsewhere refuses."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found (apt-get install -y chromium, or set OCHAT_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    """A fresh browser tab (its own context: no shared localStorage); page.errors collects script errors."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.set_default_timeout(30_000)
    yield page
    context.close()


@pytest.fixture()
def one_torch_thread():
    # 2 shared cores: one thread per process is several times faster than two fighting ones.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """The training tests' small random Llama (tests/training_data.py)."""
    from training_data import make_small_model

    return make_small_model(tmp_path_factory.mktemp("m") / "small")


@pytest.fixture(scope="session")
def scoring_server(tiny_model):
    """One small in-process server (fp32, so log-probabilities can be compared exactly) for the scoring and
    schema-fuzz tests; small limits keep every fuzzed request fast (<= 8 new tokens, 2 choices, 16 sequences)."""
    from ochat.serving.inprocess import start_server

    with start_server(str(tiny_model), max_model_len=512, dtype="float32", max_tokens_limit=8, max_n=2,
                      max_num_seqs=8, max_queue=8, disable_log_requests=True) as handle:
        yield handle
