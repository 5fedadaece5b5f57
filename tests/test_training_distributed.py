"""Two CPU processes (torchrun, gloo; DDP, FSDP2 and DeepSpeed ZeRO-2 on its CPU accelerator) == one process
seeing the same global batch, with the same gradient clipping."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from training_data import counting_conversations, make_small_model, write_conversations
from ochat.training.train import TrainArgs, train


def losses(save) -> list[float]:
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def torchrun(model, data, save, extra: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ochat",
           "train", "--model", str(model), "--data", str(data), "--save", str(save), "--epochs", "1",
           "--batch-max-len", "256", "--lr", "1e-3", "--warmup-ratio", "0", "--max-steps", "3", "--state-every", "0",
           "--seed", "3", "--max-grad-norm", "0.5", "--no-progress", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_gloo_processes_match_one_process(tmp_path):
    model = make_small_model(tmp_path / "small")
    write_conversations(model, tmp_path / "d.train.parquet", counting_conversations(60, seed=0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(TrainArgs(model=model, data=str(tmp_path / "d"), save=tmp_path / "one", grad_accum=2,
                              progress=False, epochs=1, batch_max_len=256, lr=1e-3, warmup_ratio=0.0, max_steps=3,
                              state_every=0, seed=3, max_grad_norm=0.5))
    finally:
        torch.set_num_threads(threads)
    one_losses = losses(tmp_path / "one")
    b = load_file(one / "model.safetensors")
    base = load_file(model / "model.safetensors")
    assert any(not torch.equal(b[k], base[k]) for k in b)

    grad_norms = [json.loads(x)["grad_norm"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert min(grad_norms) > 0.5  # clipping acts on every step: an engine that ignored it would differ
    for engine, extra in (("ddp", []), ("fsdp", ["--fsdp"]), ("deepspeed", ["--deepspeed", "zero2"])):
        proc = torchrun(model, tmp_path / "d", tmp_path / engine, extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 process(es) x 1 packed row(s)" in proc.stderr
        assert (engine == "deepspeed") == (tmp_path / engine / "state" / "deepspeed").is_dir()
        two_losses = losses(tmp_path / engine)
        assert len(two_losses) == len(one_losses) == 3
        assert two_losses == pytest.approx(one_losses, rel=1e-5)
        assert two_losses[0] != pytest.approx(two_losses[-1], rel=1e-3)  # the weights did move
        a = load_file(tmp_path / engine / "ep_0" / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
