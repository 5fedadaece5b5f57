"""The seed's training command, kept working on top of `ochat train`:

    deepspeed --num_gpus=8 --module ochat.training_deepspeed.train \\
        --model_path BASE --data_prefix PREFIX --save_path SAVE --batch_max_len 77824 \\
        --epochs 5 --save_every 1 --deepspeed --deepspeed_config ochat/training_deepspeed/deepspeed_config.json

    python -m ochat.training_deepspeed.train --model_path ... (one process, or under torchrun)

Every `TrainArgs` field is accepted as `--field_name` and `--field-name`; SEED_ALIASES adds the seed's
other spellings. `--deepspeed` alone (the seed's switch) means ZeRO-2; `--deepspeed_config PATH` gives
the config (the seed's two file names mean zero2 / zero3, which now live in ochat/training/deepspeed_configs).
`--local_rank` (passed by the deepspeed launcher) is accepted and ignored: the rank comes from the environment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ochat.compat import seed_main
from ochat.training.args import TrainArgs
from ochat.utils.config_cli import argparse_parser, from_namespace

PROG = "ochat.training_deepspeed.train"
SEED_ALIASES = {"--model_path": "model", "--data_prefix": "data", "--data_path": "data", "--save_path": "save",
                "--lr_warmup_ratio": "warmup_ratio"}
SEED_ONLY = {"local_rank", "deepspeed_config"}   # seed flags that are no TrainArgs field
SEED_CONFIG_NAMES = {"deepspeed_config.json": "zero2", "deepspeed_config_zero3.json": "zero3"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse_parser(TrainArgs, SEED_ALIASES, prog=PROG, exclude=("deepspeed",),
                        description="Seed-era flags for `ochat train` (see `ochat train --help`).")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="ignored (set by the launcher)")
    p.add_argument("--deepspeed", nargs="?", const="zero2", default=None, metavar="zero2|zero3|PATH",
                   help="DeepSpeed ZeRO (alone: zero2)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None, help="DeepSpeed JSON config")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainArgs, list[str]]:
    ns, unknown = build_parser().parse_known_args(argv)
    config = ns.deepspeed_config
    if config is not None and not Path(config).exists() and Path(config).name in SEED_CONFIG_NAMES:
        config = SEED_CONFIG_NAMES[Path(config).name]
    ns.deepspeed = config or ns.deepspeed
    return from_namespace(TrainArgs, ns), unknown


def main(argv: list[str] | None = None) -> int:
    from ochat.training.train import train

    return seed_main(PROG, parse_args, train, argv)


if __name__ == "__main__":
    sys.exit(main())
