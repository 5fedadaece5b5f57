"""The seed-era entry point, kept working:

    python -m ochat.serving.openai_api_server --model DIR
    python -m ochat.serving.openai_api_server --model_type openchat_3.5 --model_path DIR [--port 18888]

Same server as `ochat serve` (both spellings of each flag are accepted: --model-type / --model_type)."""

from __future__ import annotations

import argparse
import sys

from ochat.errors import report_errors
from ochat.serving.served_model import ServeConfig


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    p = argparse.ArgumentParser(prog="python -m ochat.serving.openai_api_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--model-path", "--model_path", dest="model", help="model directory")
    p.add_argument("--model-type", "--model_type", dest="model_type", default="auto")
    p.add_argument("--served-model-name", "--served_model_name", dest="served_model_name")
    p.add_argument("--engine", default="auto", choices=["auto", "transformers", "vllm"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18888)
    p.add_argument("--api-keys", "--api_keys", dest="api_keys", nargs="*", default=[])
    p.add_argument("--allowed-origins", "--allowed_origins", "--cors-origins", dest="cors_origins", nargs="*", default=[])
    p.add_argument("--log-file", "--log_file", dest="log_file")
    p.add_argument("--disable-log-requests", "--disable_log_requests", dest="disable_log_requests", action="store_true")
    p.add_argument("--disable-log-stats", "--disable_log_stats", dest="disable_log_stats", action="store_true")
    p.add_argument("--max-num-seqs", "--max_num_seqs", dest="max_num_seqs", type=int, default=64)
    p.add_argument("--max-queue", "--max_queue", dest="max_queue", type=int, default=1024)
    p.add_argument("--max-model-len", "--max_model_len", dest="max_model_len", type=int)
    p.add_argument("--tensor-parallel-size", "--tensor_parallel_size", dest="tensor_parallel_size", type=int, default=1)
    p.add_argument("--dtype", default="auto")
    a = p.parse_args(argv)
    if not a.model:
        p.error("give --model DIR (or --model_path DIR)")
    keys = [k.strip() for item in a.api_keys for k in item.split(",") if k.strip()]
    return ServeConfig(model=a.model, model_type=a.model_type, served_model_name=a.served_model_name, engine=a.engine,
                       host=a.host, port=a.port, api_keys=keys, cors_origins=a.cors_origins, log_file=a.log_file,
                       disable_log_requests=a.disable_log_requests, disable_log_stats=a.disable_log_stats,
                       max_num_seqs=a.max_num_seqs, max_queue=a.max_queue, max_model_len=a.max_model_len,
                       tensor_parallel_size=a.tensor_parallel_size, dtype=a.dtype)


def main(argv: list[str] | None = None) -> int:
    from ochat.serving.cli import run_server

    return report_errors(lambda: run_server(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
