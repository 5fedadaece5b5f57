"""The seed's `ochat.training_deepspeed.train` flags map onto `ochat train`."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from training_data import counting_conversations, make_small_model, write_conversations
from ochat.training_deepspeed.train import main


def test_seed_flags_train_and_deepspeed_is_optional(tmp_path, capsys):
    model = make_small_model(tmp_path / "small")
    write_conversations(model, tmp_path / "d.train.parquet", counting_conversations(12, 0))
    flags = ["--local_rank", "0", "--model_path", str(model), "--data_prefix", str(tmp_path / "d"),
             "--batch_max_len", "256", "--epochs", "1", "--lr", "1e-3", "--save_every", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(flags + ["--save_path", str(tmp_path / "out")]) == 0
    finally:
        torch.set_num_threads(threads)
    meta = json.loads((tmp_path / "out" / "ep_0" / "ochat.json").read_text())
    assert meta["training"]["batch_max_len"] == 256 and meta["training"]["lr"] == 1e-3
    assert (tmp_path / "out" / "ep_0" / "model.safetensors").exists()

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed installed: the missing-package message is not reachable")
    capsys.readouterr()
    assert main(flags + ["--save_path", str(tmp_path / "ds"), "--deepspeed"]) == 2
    assert "--deepspeed needs the package deepspeed" in capsys.readouterr().err
