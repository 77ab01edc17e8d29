"""Shared plumbing of the stage tasks: config loading, report paths, the project lock."""
from __future__ import annotations

import abc
import json
import logging
import threading
from pathlib import Path
from typing import Any

from vlgrpo.config import Config, load_config
from vlgrpo.io import atomic_write_json, under_root

STAGES = ("data", "validate", "base", "pilot", "train", "evaluate", "register")


class StageFailed(RuntimeError):
    """A stage refused or failed for a reason the user can act on (the message says which)."""


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
