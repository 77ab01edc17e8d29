"""Running `dvc` from the `vlgrpo` command: the dvc of this venv, and `dvc repro` with the pipeline's env.

Kept free of Prefect and MLflow imports, so that `vlgrpo repro` with every stage up to date starts neither.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def dvc_executable() -> str:
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else "dvc"


def dvc_repro(root: Path, dvc_args: list[str]) -> int:
    # The child stages see VLGRPO_PARENT_RUN_ID (MLflow), VLGRPO_PREFECT_PARENT_FLOW_RUN and PREFECT_API_URL.
    return subprocess.run([dvc_executable(), "repro", *dvc_args], cwd=root, env=os.environ.copy()).returncode
