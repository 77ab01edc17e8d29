"""Atomic file writes: a reader sees the old file or the complete new one, never half of either.

Every report, manifest and checkpoint file the pipeline writes goes through here, so a killed or failed
stage leaves earlier results untouched.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


class DiskFull(OSError):
    """A write hit ENOSPC; the message is one line naming the folder, the space free and the space needed."""


def tree_size(path: str | Path) -> int:
    """Bytes under ``path`` (a file or a directory tree); 0 when absent."""
    path = Path(path)
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc``, or an exception it was raised from, is ENOSPC (also when wrapped by a library)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        # shutil.Error lists per-file errors; safetensors' writer raises its own type ("os error 28").
        if isinstance(e, shutil.Error) and "[Errno 28]" in str(e) or "(os error 28)" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full(target: str | Path, needed: int, estimate: str = "about") -> DiskFull:
    """The one-line ENOSPC error for a write of ``estimate`` (exactly / about / more than) ``needed`` bytes."""
    target = Path(target)
    folder = target.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    short = f"free at least {_mb(needed - free)} there" if needed > free else "free space there"
    return DiskFull(errno.ENOSPC, f"no space left on device in {folder}: writing {target.name} needs "
                    f"{estimate} {_mb(needed)} and {_mb(free)} is free; {short} and run it again "
                    f"(earlier results are unchanged)")


@contextlib.contextmanager
def _enospc_names(target: Path, written: Path | None = None, like: Path | None = None) -> Iterator[None]:
    """Turn ENOSPC inside the block into :class:`DiskFull` for ``target``.

    The space needed is estimated from ``like`` (the previous version of the target, or a sibling of the
    same kind: a report or checkpoint is about as big as the last one); without one, what was ``written``
    before the disk filled is a lower bound.
    """
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:  # noqa: BLE001 - writers report ENOSPC as OSError, or wrapped (safetensors' Rust)
        if not is_disk_full(e):
            raise
        prev = tree_size(like) if like is not None else 0
        partial = tree_size(written) if written is not None else 0
        if prev >= partial and prev > 0:
            raise disk_full(target, prev, "about") from e
        raise disk_full(target, max(partial, 1), "more than") from e


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    A full disk raises :class:`DiskFull` (naming the folder and the space needed); ``path`` stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _enospc_names(path, like=path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _enospc_names(path, tmp_path, like=path):
            yield tmp_path
            with open(tmp_path, "rb") as f:  # make the bytes durable before the rename publishes them
                os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as e:  # here the exact size is known
            if e.errno == errno.ENOSPC:
                raise disk_full(path, len(data), "exactly") from e
            raise


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
def atomic_dir(path: str | Path, like: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; swap it in only if the block succeeds.

    The old directory is moved aside first and removed after the swap, so at every instant ``path`` is
    either the complete old or the complete new directory (or, for a moment, absent - never partial).
    A full disk raises :class:`DiskFull` (naming the folder and the space needed, estimated from the old
    ``path`` or from ``like``, a directory about as big as the new one); ``path`` stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    like = Path(like) if like is not None and Path(like).exists() else path
    with _enospc_names(path, like=like):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _enospc_names(path, tmp, like=like):
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


HASHES_FILE = "vlgrpo-sha256.json"


class ContentMismatch(RuntimeError):
    """A file's bytes no longer match the content hash recorded when it was written."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_content_hashes(folder: str | Path, rebuild: str) -> Path:
    """Record the sha256 of every file directly in ``folder`` (and the command that rebuilds it) there.

    Sub-folders (a model's training checkpoints) are not covered: they are read back by their own loader.

    Call it on the temporary directory of an :func:`atomic_dir` block, so the hashes and the files are
    published together.
    """
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): sha256_file(p)
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != HASHES_FILE}
    path = folder / HASHES_FILE
    path.write_text(json.dumps({"rebuild": rebuild, "sha256": files}, indent=1) + "\n", encoding="utf-8")
    return path


def verify_content_hashes(folder: str | Path) -> int:
    """Check every file recorded by :func:`write_content_hashes`; returns how many were checked.

    Raises :class:`ContentMismatch` naming the first changed or missing file and the command that rebuilds
    it. A folder without a hashes file (a user's own checkpoint) is not checked (returns 0).
    """
    folder = Path(folder)
    path = folder / HASHES_FILE
    if not path.is_file():
        return 0
    record = json.loads(path.read_text(encoding="utf-8"))
    rebuild = record.get("rebuild") or "the stage that wrote it"
    for rel, want in record["sha256"].items():
        f = folder / rel
        got = sha256_file(f) if f.is_file() else "missing"
        if got != want:
            raise ContentMismatch(f"{f}: content changed since it was written (sha256 {got[:12]}, recorded "
                                  f"{want[:12]}); the file is corrupt - rebuild it with `{rebuild}`")
    return len(record["sha256"])


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
