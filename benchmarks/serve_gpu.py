"""GPU check: `ochat serve --engine transformers` (CUDA, bf16) vs `transformers serve --continuous-batching` on the
same GPU, the same random ~1B Llama (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads, 4 KV heads) and
the same load: streaming chat clients at concurrency 1, 32 and 128, fixed output lengths, greedy.

    python benchmarks/serve_gpu.py --out gpu_serve.json                 # on a GPU machine: < 8 min on an H200
    python benchmarks/serve_gpu.py --size tiny --levels 1,2 --rounds 1  # anywhere (the test runs this on CPU)

Needs ochat's dependencies and the `transformers` command (transformers[serving]); no vLLM. Prints one line per
server and level, then the c=32 ratio, and writes the figures, the device and the versions to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {"1b": dict(arch="llama", hidden_size=2048, layers=22, heads=32, kv_heads=4, intermediate_size=5632),
         "tiny": dict(arch="llama", hidden_size=128, layers=2, heads=4)}


def _device() -> dict:
    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--levels", default="1,32,128", help="comma-separated client counts")
    p.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--level-timeout", type=float, default=60.0, help="stop launching requests after this many s")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=Path("gpu_serve.json"))
    args = p.parse_args(argv)

    import shutil

    from ochat.models.tiny import make_tiny_model
    from ochat.serving.bench import _free_port, bench_servers, sharegpt_prompts
    from ochat.utils.atomic import atomic_write_text

    cli = shutil.which("transformers")
    if cli is None:
        print("error: the `transformers` command is not installed (pip install 'transformers[serving]')", file=sys.stderr)
        return 2
    levels = [int(c) for c in args.levels.split(",") if c.strip()]
    started = time.monotonic()
    info = _device()
    print(f"device: {json.dumps(info)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ochat-gpu-serve-") as work:
        model = make_tiny_model(Path(work) / args.size, "mistral-common", "openchat_3.5", max_positions=4096,
                                **SIZES[args.size])
        print(f"model {model} ({args.size}) made in {time.monotonic() - started:.0f} s", flush=True)
        prompts = sharegpt_prompts()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        fixed = {"ignore_eos": True, "stream_options": {"include_usage": True}}
        port, peer_port = _free_port(), _free_port()
        ochat_cmd = [sys.executable, "-m", "ochat", "serve", "--model", str(model), "--engine", "transformers",
                     "--dtype", args.dtype, "--port", str(port), "--max-num-seqs", str(max(levels)),
                     "--disable-log-requests", "--disable-log-stats"]
        peer_cmd = [cli, "serve", str(model), "--continuous-batching", "--dtype", args.dtype, "--host", "127.0.0.1",
                    "--port", str(peer_port)]
        specs = [{"name": "ochat serve --engine transformers", "cmd": ochat_cmd, "env": env, "extra": fixed,
                  "model": "openchat_3.5", "ready_url": f"http://127.0.0.1:{port}/health",
                  "base_url": f"http://127.0.0.1:{port}/v1"},
                 {"name": "transformers serve --continuous-batching", "cmd": peer_cmd, "env": env, "extra": {},
                  "model": str(model), "ready_url": f"http://127.0.0.1:{peer_port}/health",
                  "base_url": f"http://127.0.0.1:{peer_port}/v1"}]
        # One after the other: on one GPU each server sizes its KV cache from the memory left free.
        results = bench_servers(specs, prompts, levels, args.rounds, args.max_tokens, args.level_timeout, Path(work),
                                start_timeout=300)
    tps = {r["name"]: {row["concurrency"]: row["output_tokens_per_s"] for row in r["levels"]} for r in results}
    ours, theirs = (tps[r["name"]] for r in results)
    level = 32 if 32 in levels else max(levels)
    summary = (f"c={level}: ochat serve {ours.get(level, 0):.0f} tok/s, transformers serve --continuous-batching "
               f"{theirs.get(level, 0):.0f} tok/s" + (f" ({ours[level] / theirs[level]:.2f}x)"
                                                     if ours.get(level) and theirs.get(level) else ""))
    print(summary)
    atomic_write_text(args.out, json.dumps({"device": info, "size": args.size, "dtype": args.dtype,
                                            "settings": vars(args) | {"out": str(args.out)}, "results": results,
                                            "summary": summary, "seconds": round(time.monotonic() - started, 1)},
                                           indent=2))
    print(f"wrote {args.out} ({time.monotonic() - started:.0f} s in all)")
    return 0 if all(r["levels"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
