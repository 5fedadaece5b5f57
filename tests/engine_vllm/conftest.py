"""The vLLM engine's tests need a Python with vLLM: the virtualenv that `.ci/run` makes (`.ci/vllm_venv`).
tests/test_serving_vllm.py runs them there; any other Python collects nothing from this folder."""

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]
