"""Shared plumbing of the stage tasks: config loading, report paths, the project lock."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlgrpo.config import Config, load_config
from vlgrpo.io import atomic_write_json

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
    return Path(root) / cfg.data.out_dir / "manifest.jsonl"
