"""Shared plumbing of the stage tasks: config loading, report paths, expected failures, side threads."""
from __future__ import annotations

import abc
import functools
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

from vlgrpo.config import Config, ConfigError, load_config
from vlgrpo.data.images import CorruptCacheFile
from vlgrpo.io import ContentMismatch, DiskFull, LockBusy, atomic_write_json, under_root

F = TypeVar("F", bound=Callable[..., Any])

STAGES = ("data", "validate", "base", "pilot", "train", "evaluate", "register")


class StageFailed(RuntimeError):
    """A stage refused or failed for a reason the user can act on (the message says which)."""


# Failures the user can act on: their message is the whole story, a traceback would only say "crash".
EXPECTED = (StageFailed, ConfigError, LockBusy, DiskFull, ContentMismatch, CorruptCacheFile)


def expected_failures(fn: F) -> F:
    """Wrap a flow function (put it under ``@flow``): an expected failure ends the run Failed, no traceback.

    Prefect logs an exception raised in a task or flow with its full traceback, and again in each flow
    that called it, so invalid data or a failed gate read as a crash. Returning a ``Failed`` state instead
    records the reason as the Prefect run's state message, once, and the caller (a parent flow or the CLI)
    gets ``prefect.exceptions.FailedRun`` carrying that message. Any other exception (a real crash)
    propagates untouched, with its full traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from prefect.exceptions import FailedRun
        from prefect.states import Failed

        try:
            return fn(*args, **kwargs)
        except (*EXPECTED, FailedRun) as e:  # FailedRun: a nested stage flow already failed this way
            return Failed(message=str(e))

    return wrapper  # type: ignore[return-value]


def load(params: str | Path = "params.yaml", root: str | Path | None = None) -> tuple[Config, Path]:
    params = Path(params)
    root = Path(root) if root is not None else params.resolve().parent
    return load_config(params), root.resolve()


def report_path(root: Path, stage: str, suffix: str = ".json") -> Path:
    return Path(root) / "reports" / f"{stage}{suffix}"


def write_report(root: Path, stage: str, report: dict[str, Any]) -> Path:
    path = report_path(root, stage)
    atomic_write_json(path, report)
    return path


def read_report(root: Path, stage: str) -> dict[str, Any] | None:
    path = report_path(root, stage)
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def manifest_path(cfg: Config, root: Path) -> Path:
    return under_root(root, cfg.data.out_dir) / "manifest.jsonl"


class BackgroundLoop(abc.ABC):
    """Run ``tick()`` every ``interval`` seconds on a daemon thread while a ``with`` block runs.

    For side work beside training (progress display, metrics forwarding): a failing tick is logged and
    retried at the next interval, never allowed to stop the work it watches. Subclasses define ``tick`` and
    may extend ``__enter__`` / ``__exit__`` (call super) for a first or last tick.
    """

    interval: float = 5.0
    name: str = "vlgrpo-background"

    @abc.abstractmethod
    def tick(self) -> None:
        """One round of the side work; an exception is logged and the next round tries again."""

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - side work must never stop training
                logging.getLogger("vlgrpo.tasks").warning("%s deferred: %s", self.name, e)

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class ConsoleProgress(BackgroundLoop):
    """A console progress bar for a training run: step, reward, KL and the ETA, read from its metrics stream.

    The trainer appends one JSON line per step; this thread reads the new lines every ``interval`` seconds, so
    the core needs no display code and a resumed run starts the bar at its first new step.
    """

    name = "progress bar"

    def __init__(self, stream: Path, total_steps: int, desc: str, interval: float = 1.0):
        self.stream, self.total, self.desc, self.interval = Path(stream), total_steps, desc, interval
        self._offset, self._bar = 0, None

    def _new_rows(self) -> list[dict[str, Any]]:
        try:
            with open(self.stream, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # complete lines only; a partial tail is read next time
        self._offset += end
        return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]

    def tick(self) -> None:
        from tqdm.auto import tqdm

        rows = self._new_rows()
        if not rows:
            return
        step = int(rows[-1].get("step", 0))
        if self._bar is None:
            first = int(rows[0].get("step", 1)) - 1  # resumed runs start past 0; the ETA counts new steps only
            self._bar = tqdm(total=self.total, initial=first, desc=self.desc, dynamic_ncols=True,
                             file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| step {n_fmt}/"
                             "{total_fmt} [{elapsed}<{remaining}{postfix}]")
        self._bar.set_postfix_str(f"reward {_fmt(rows[-1].get('reward'))}, kl {_fmt(rows[-1].get('kl'))}",
                                  refresh=False)
        self._bar.update(step - self._bar.n)

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        try:
            self.tick()  # the last steps written before the run ended
        except Exception:  # noqa: BLE001 - a display must never mask the run's own outcome
            pass
        finally:
            if self._bar is not None:
                self._bar.close()


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"
