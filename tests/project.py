"""A throwaway copy of the project (a real git + DVC repo) with tiny params, for end-to-end tests.

The copy holds the committed files of this checkout, so `dvc repro`, `vlgrpo ...` and a Prefect worker run
the real stage commands; the tiny params make each stage take seconds instead of minutes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_PARAMS = {
    "data": {"num_train": 32, "num_val": 8, "num_test": 12},
    "base": {"warmup_steps": 3, "batch_size": 8},
    "pilot": {"overrides": {"max_steps": 2, "subset": 16}, "max_kl": 100.0, "min_reward_slope": -100.0},
    "train": {"max_steps": 3, "prompts_per_step": 2, "num_generations": 4, "micro_batch_size": 4,
              "max_completion_length": 4, "save_steps": 2},
    "evaluate": {"bootstrap": 100, "batch_size": 16},
}


def deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def project_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API", "VLGRPO_"))}
    env.update({"PATH": f"{BIN}:{env.get('PATH', '')}", "HOME": env.get("HOME", str(root))})
    env.update(extra)
    return env


def make_project(dest: Path, params: dict | None = None, model_name: str = "vlgrpo-test") -> Path:
    """Copy the tracked files of this checkout to ``dest``, write tiny params, commit, and return ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    cfg = yaml.safe_load((ROOT / "params.yaml").read_text())
    deep_update(cfg, TINY_PARAMS)
    deep_update(cfg, {"register": {"model_name": model_name}})
    deep_update(cfg, params or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    # A remote of its own, so pushes from tests never touch the user's ~/.cache remote.
    remote = dest.parent / f"{dest.name}-dvc-remote"
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([str(BIN / "dvc"), "remote", "modify", "local", "url", str(remote)], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "test project"], cwd=dest, check=True)
    return dest


def run(cmd: list[str], root: Path, timeout: float = 900, check: bool = True, **env: str
        ) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=root, env=project_env(root, **env), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                             f"--- stderr\n{p.stderr[-6000:]}")
    return p
