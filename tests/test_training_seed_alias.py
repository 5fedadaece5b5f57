"""The seed's `ochat.training_deepspeed.train` flags and `ochat train`'s options both come from TrainArgs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ochat.compat.training import SEED_ALIASES, SEED_ONLY, build_parser, main, parse_args
from ochat.training.args import TrainArgs
from training_data import counting_conversations, write_conversations
from cli_options import assert_options_are_the_fields, assert_shim_accepts_the_fields


def test_ochat_train_options_are_exactly_the_trainargs_fields():
    from ochat.training.cli import train

    assert_options_are_the_fields(train, TrainArgs)


def test_seed_shim_accepts_every_field_and_nothing_that_is_not_one():
    assert_shim_accepts_the_fields(build_parser(), TrainArgs, SEED_ALIASES, SEED_ONLY)


def test_seed_spellings_parse_to_trainargs():
    seed = ["--local_rank", "3", "--model_path", "m", "--data_prefix", "d", "--save_path", "s", "--batch_max_len",
            "77824", "--epochs", "5", "--lr_warmup_ratio", "0.05", "--lr", "auto", "--deepspeed",
            "--deepspeed_config", "ochat/training_deepspeed/deepspeed_config_zero3.json", "--future_flag", "1"]
    args, unknown = parse_args(seed)
    assert args == TrainArgs(model=Path("m"), data="d", save=Path("s"), batch_max_len=77824, epochs=5, warmup_ratio=0.05,
                             lr="auto", deepspeed="zero3")
    assert unknown == ["--future_flag", "1"]
    assert parse_args(["--model_path", "m", "--data_path", "d", "--save_path", "s", "--deepspeed"])[0].deepspeed == "zero2"
    assert parse_args(["--model", "m", "--data", "d", "--save", "s", "--no-progress"])[0].progress is False


@pytest.mark.usefixtures("one_torch_thread")
def test_seed_flags_train(small_model, tmp_path, capsys):
    write_conversations(small_model, tmp_path / "d.train.parquet", counting_conversations(12, 0))
    flags = ["--local_rank", "0", "--model_path", str(small_model), "--data_prefix", str(tmp_path / "d"),
             "--batch_max_len", "256", "--epochs", "1", "--lr", "1e-3", "--save_every", "1", "--no-progress"]
    assert main(flags + ["--save_path", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "ep_0" / "ochat.json").read_text())
    assert meta["training"]["batch_max_len"] == 256 and meta["training"]["lr"] == 1e-3
    assert (tmp_path / "out" / "ep_0" / "model.safetensors").exists()
    capsys.readouterr()
    assert main(flags + ["--save_path", str(tmp_path / "bad"), "--lr", "fast"]) == 2
    assert capsys.readouterr().err.strip() == "error: --lr fast: expected a number (e.g. 2e-5) or 'auto'"
