"""Where a GRPO run reads and writes (torch-free, so flows and tasks can build it without loading torch)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlgrpo.io import under_root


@dataclass(frozen=True)
class RunPaths:
    """Where a run reads and writes; build it with ``RunPaths.under`` so relative paths are taken under the
    project root.

    ``init_model_dir`` may also be a hub id (kept as it is when no such folder exists under ``root``).
    """
    root: Path
    manifest: Path
    init_model_dir: Path | str
    out_dir: Path
    metrics_path: Path

    @classmethod
    def under(cls, root: str | Path, manifest: str | Path, init_model_dir: str | Path, out_dir: str | Path,
              metrics_path: str | Path) -> "RunPaths":
        """Paths of a run in project ``root``: the manifest, the starting model, the output folder, the
        metrics stream; each resolved with ``vlgrpo.io.under_root``."""
        root = Path(root)
        init = under_root(root, init_model_dir)
        return cls(root, under_root(root, manifest), init if init.exists() else init_model_dir,
                   under_root(root, out_dir), under_root(root, metrics_path))
