"""Atomic file writes: a reader sees the old file or the complete new one, never half of either.

Every report, manifest and checkpoint file the pipeline writes goes through here, so a killed or failed
stage leaves earlier results untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; swap it in only if the block succeeds.

    The old directory is moved aside first and removed after the swap, so at every instant ``path`` is
    either the complete old or the complete new directory (or, for a moment, absent - never partial).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class LockBusy(RuntimeError):
    """Another vlgrpo process holds the project lock."""


@contextlib.contextmanager
def project_lock(root: str | Path, what: str = "pipeline") -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on ``<root>/.vlgrpo.lock`` for the block.

    Two pipeline runs on one project would race on data/, models/ and the registry; the second refuses at
    once with the holder's pid and command instead of queueing. The OS drops the lock when the holder dies
    (even on kill -9), so a crash never leaves the project locked.
    """
    import fcntl

    path = Path(root) / ".vlgrpo.lock"
    f = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            raise LockBusy(f"another vlgrpo run holds {path} ({holder}); wait for it to finish "
                           f"or stop it - refusing to run a second {what} on the same project") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}: {what}\n")
        f.flush()
        yield path
    finally:
        f.close()


def under_root(root: str | Path, p: str | Path) -> Path:
    """``p`` as a path under the project ``root`` when it is relative; an absolute ``p`` (or ``~/...``) as it is.

    The one rule for every path a stage reads from params.yaml (data, models, reward plugins, CLIP weights):
    relative to the project root, never to the current directory, so a stage runs the same from any folder.
    """
    p = Path(p).expanduser()
    return p if p.is_absolute() else Path(root) / p
