"""Write files and directories so that a killed process (or a power cut) never leaves a half-written result.

A result is written under a hidden temporary name next to its destination (`.NAME.XXXX.tmp`), flushed
to disk (fsync of every file and of the directory), then renamed into place and the parent directory
fsynced, so after a crash the destination holds either the old or the new content, whole. Replacing
a directory takes two renames (`NAME` -> `.NAME.old`, temporary -> `NAME`); `clean_stale` (run at the
start of a job writing there) puts back a `.NAME.old` whose replacement never arrived and removes
temporaries left by a killed process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

STALE = re.compile(r"^\.(?P<name>.+?)\.(?:[A-Za-z0-9_]{6,}(?:\..+)?\.tmp|old)$")


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory entry list, to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (files first, then the directories holding them)."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                fsync_path(p)
        fsync_path(Path(dirpath))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any written file
    try:
        yield tmp_path
        fsync_path(tmp_path)
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def commit_dir(tmp: Path, path: Path, overwrite: bool = False) -> None:
    """Make the finished directory `tmp` become `path` (durably), replacing an old `path` if `overwrite`."""
    fsync_tree(tmp)
    if path.exists():
        if not overwrite:
            raise FileExistsError(path)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; it becomes `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        commit_dir(tmp, path, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_stale(directory: str | os.PathLike) -> list[str]:
    """Remove our temporaries from `directory` and restore a `.NAME.old` whose NAME is missing (a crash
    between the two renames of a directory replacement). Returns what was done, one line per entry.
    Only for directories that one job writes at a time."""
    directory = Path(directory)
    done = []
    if not directory.is_dir():
        return done
    for p in sorted(directory.iterdir()):
        m = STALE.match(p.name)
        if m is None:
            continue
        target = directory / m["name"]
        if p.name.endswith(".old") and not target.exists():
            os.replace(p, target)
            done.append(f"restored {target} from {p.name}")
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        done.append(f"removed {p}")
    if done:
        fsync_path(directory)
    return done


def append_jsonl(path: str | os.PathLike, row: dict, durable: bool = False) -> None:
    """Append one finished record in one write (O_APPEND: lines from several processes never interleave);
    a crash loses at most this line (dropped on resume). `durable` also fsyncs it."""
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
