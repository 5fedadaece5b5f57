"""kill -9 in the middle of an epoch, then --resume: same final weights; never a half-written checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from training_data import counting_conversations, make_small_model, write_conversations
from ochat.training.train import TrainArgs, train

EP_FILES = {"config.json", "model.safetensors", "ochat.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"}
STATE_FILES = {"state.pt", "rng.pt", "progress.json"}


def visible_checkpoints_complete(save: Path) -> bool:
    """Every checkpoint a user (or --resume) can see is whole: temporaries are hidden dot-dirs."""
    try:
        for p in save.iterdir():
            if p.name.startswith("ep_") and not EP_FILES <= {f.name for f in p.iterdir()}:
                return False
            if p.name == "state" and not STATE_FILES <= {f.name for f in p.iterdir()}:
                return False
    except FileNotFoundError:  # a directory renamed away while listing: look again next time
        return True
    return True


def steps_logged(save: Path) -> int:
    path = save / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def test_kill_mid_epoch_then_resume_gives_same_weights(tmp_path):
    model = make_small_model(tmp_path / "small")
    write_conversations(model, tmp_path / "d.train.parquet", counting_conversations(64, seed=0))
    write_conversations(model, tmp_path / "d.eval.parquet", counting_conversations(10, seed=1))
    flags = dict(epochs=2, batch_max_len=128, lr=2e-3, state_every=3, seed=5)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = train(TrainArgs(model=model, data=str(tmp_path / "d"), save=tmp_path / "ref", progress=False, **flags))
    finally:
        torch.set_num_threads(threads)
    total_steps = steps_logged(tmp_path / "ref")
    assert total_steps >= 20

    save = tmp_path / "crash"
    cmd = [sys.executable, "-m", "ochat", "train", "--model", str(model), "--data", str(tmp_path / "d"),
           "--save", str(save), "--no-progress"]
    for k, v in flags.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_at = total_steps // 4  # in the middle of the first epoch
    deadline = time.time() + 240
    while steps_logged(save) < kill_at:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert visible_checkpoints_complete(save)
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    assert visible_checkpoints_complete(save)
    progress = json.loads((save / "state" / "progress.json").read_text())
    assert progress["epoch"] == 0 and 0 < progress["step_in_epoch"] and progress["global_step"] < total_steps // 2
    assert not (save / "ep_0").exists()

    rerun = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at epoch 0, step {progress['global_step']}" in rerun.stderr
    assert steps_logged(save) == total_steps  # metrics of redone steps are not duplicated

    final, expected = load_file(save / "ep_1" / "model.safetensors"), load_file(reference / "model.safetensors")
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], rtol=1e-5, atol=1e-6)
    ref_eval = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    new_eval = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert [r["eval_loss"] for r in new_eval] == [r["eval_loss"] for r in ref_eval] or all(
        abs(a["eval_loss"] - b["eval_loss"]) < 1e-5 for a, b in zip(new_eval, ref_eval))


def test_full_disk_on_save_keeps_the_previous_checkpoint(tmp_path, capsys):
    """A real full disk (a 6 MiB tmpfs): the failed save is one clear line; ep_0 and state stay whole."""
    from ochat.cli import main

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        import pytest

        pytest.skip("needs root to mount a small tmpfs")
    try:
        model = make_small_model(tmp_path / "small")
        write_conversations(model, tmp_path / "d.train.parquet", counting_conversations(16, seed=0))
        base = ["train", "--model", str(model), "--data", str(tmp_path / "d"), "--save", str(disk / "run"),
                "--batch-max-len", "256", "--lr", "1e-3", "--no-progress", "--state-every", "0"]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert main(base + ["--epochs", "1"]) == 0
            before = {p: p.read_bytes() for p in [*(disk / "run" / "ep_0").iterdir(), *(disk / "run" / "state").iterdir()]}
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            (disk / "filler").write_bytes(b"\0" * (free - 300_000))  # room for metrics, not for a checkpoint
            capsys.readouterr()
            code = main(base + ["--epochs", "2", "--resume"])
        finally:
            torch.set_num_threads(threads)
        err = capsys.readouterr().err
        assert code == 2, err
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: ") and "writing the checkpoint failed" in line and "intact" in line
        assert "Traceback" not in err
        assert not (disk / "run" / "ep_1").exists()
        assert visible_checkpoints_complete(disk / "run")
        assert {p: p.read_bytes() for p in before} == before  # ep_0 and state byte for byte
        assert [p.name for p in (disk / "run").iterdir() if p.name.startswith(".")] == []  # no temporaries left
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_resume_refuses_another_run_and_overwrite_starts_afresh(small_model, tmp_path, capsys, one_torch_thread):
    """--resume with other data, seed, batch budget or accumulation: one line naming what differs. A
    killed run's temporaries are removed and a half-done directory swap is undone at the start;
    --overwrite removes the old state and metrics."""
    from ochat.cli import main

    write_conversations(small_model, tmp_path / "d.train.parquet", counting_conversations(24, seed=0))
    write_conversations(small_model, tmp_path / "e.train.parquet", counting_conversations(24, seed=9))
    save = tmp_path / "run"
    base = ["train", "--model", str(small_model), "--save", str(save), "--batch-max-len", "128", "--lr", "1e-3",
            "--epochs", "1", "--max-steps", "2", "--no-progress", "--seed", "1"]
    assert main(base + ["--data", str(tmp_path / "d")]) == 0
    state = torch.load(save / "state" / "state.pt", weights_only=True)  # tensors and plain values only
    assert "model" in state and "optimizer" in state
    capsys.readouterr()
    for extra, named in ((["--data", str(tmp_path / "e")], "data 'sha256:"), (["--seed", "2"], "seed 1 there, 2 here"),
                         (["--batch-max-len", "256"], "batch_max_len 128 there, 256 here"),
                         (["--grad-accum", "2"], "grad_accum 1 there, 2 here")):
        argv = base + ["--data", str(tmp_path / "d"), "--resume"] + extra
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: --resume: ") and named in err[-1] and "--overwrite" in err[-1], err
        assert "Traceback" not in "\n".join(err)

    # A killed run's leftovers: a temporary checkpoint directory, a temporary file, and ep_0 moved aside
    # by a replacement that never arrived.
    (save / ".ep_0.k3j9x2ab.tmp").mkdir()
    (save / ".metrics.jsonl.ab12cd.tmp").write_text("partial")
    os.replace(save / "ep_0", save / ".ep_0.old")
    assert main(base + ["--data", str(tmp_path / "d"), "--resume"]) == 0
    names = {p.name for p in save.iterdir()}
    assert "ep_0" in names and not {n for n in names if n.startswith(".")}
    err = capsys.readouterr().err
    assert "restored" in err and "removed" in err

    before = (save / "metrics.jsonl").read_text()
    assert main(base + ["--data", str(tmp_path / "e"), "--seed", "2", "--overwrite", "--max-steps", "1"]) == 0
    rows = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1] and before != (save / "metrics.jsonl").read_text()
    assert json.loads((save / "state" / "progress.json").read_text())["run"]["seed"] == 2


def test_atomic_dir_fsyncs_every_file_and_the_directories(tmp_path, monkeypatch):
    from ochat.utils import atomic

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with atomic.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b")
        tmp_name = tmp.name
    names = [Path(p).name for p in synced]
    assert {"a.bin", "b.bin", "sub", tmp_name} <= set(names) and str(tmp_path) in synced
    assert names.index("b.bin") < names.index("sub") < names.index(tmp_name)  # contents before their directory
    synced.clear()
    atomic.atomic_write_text(tmp_path / "f.txt", "x")
    assert str(tmp_path) in synced and any(Path(p).name.startswith(".f.txt.") for p in synced)
