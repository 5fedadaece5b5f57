"""The seed's training command, kept working on top of `ochat train`:

    deepspeed --num_gpus=8 --module ochat.training_deepspeed.train \\
        --model_path BASE --data_prefix PREFIX --save_path SAVE --batch_max_len 77824 \\
        --epochs 5 --save_every 1 --deepspeed --deepspeed_config ochat/training_deepspeed/deepspeed_config.json

    python -m ochat.training_deepspeed.train --model_path ... (one process, or under torchrun)

The seed's snake_case flags map onto `TrainArgs`; `--deepspeed` (the seed's flag) uses DeepSpeed with
`--deepspeed_config` (default: the ZeRO-2 bf16 config next to this file); `--local_rank` (passed by
the deepspeed launcher) is accepted and ignored, the rank comes from the environment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ochat.errors import report_errors

DEFAULT_CONFIG = Path(__file__).with_name("deepspeed_config.json")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="ochat.training_deepspeed.train",
                                description="Seed-era flags for `ochat train` (see `ochat train --help`).")
    p.add_argument("--local_rank", type=int, default=None)
    p.add_argument("--model_type", default=None)
    p.add_argument("--model_path", required=True)
    p.add_argument("--data_prefix", "--data_path", dest="data_prefix", required=True)
    p.add_argument("--save_path", required=True)
    p.add_argument("--batch_max_len", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", default="2e-5")
    p.add_argument("--lr_min_ratio", type=float, default=0.1)
    p.add_argument("--lr_warmup_ratio", "--warmup_ratio", dest="warmup_ratio", type=float, default=0.03)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--eps", type=float, default=1e-5)
    p.add_argument("--save_every", type=int, default=1)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--deepspeed", action="store_true")
    p.add_argument("--deepspeed_config", default=None)
    return p.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    from ochat.training.cli import parse_lr
    from ochat.training.train import TrainArgs, train

    ns, unknown = parse_args(argv)
    if unknown:
        print(f"ochat.training_deepspeed.train: ignoring unknown seed flags {unknown}", file=sys.stderr)
    deepspeed_config = None
    if ns.deepspeed or ns.deepspeed_config:
        deepspeed_config = Path(ns.deepspeed_config) if ns.deepspeed_config else DEFAULT_CONFIG
    return report_errors(lambda: train(TrainArgs(
        model=Path(ns.model_path), data=ns.data_prefix, save=Path(ns.save_path), model_type=ns.model_type,
        epochs=ns.epochs, batch_max_len=ns.batch_max_len, grad_accum=ns.grad_accum, lr=parse_lr(str(ns.lr)),
        lr_min_ratio=ns.lr_min_ratio, warmup_ratio=ns.warmup_ratio, weight_decay=ns.weight_decay, beta1=ns.beta1,
        beta2=ns.beta2, eps=ns.eps, save_every=ns.save_every, seed=ns.seed, resume=ns.resume,
        deepspeed=deepspeed_config)))


if __name__ == "__main__":
    sys.exit(main())
