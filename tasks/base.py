"""Task of the `base` stage: a thin adapter over vlgrpo.train.warm_start (the supervised warm start)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from vlgrpo.config import Config


# Never retried: a retry would silently double the compute and hide the failure.
@task(name="warm-start-base", retries=0, cache_policy=NO_CACHE)
def base_task(cfg: Config, root: Path, manifest: Path) -> dict[str, Any]:
    from vlgrpo.train.warm_start import run_base

    return run_base(cfg, root, manifest, progress=True)
