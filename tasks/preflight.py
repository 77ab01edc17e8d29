"""The pre-flight check every `vlgrpo` command runs first (and `vlgrpo check` runs alone).

It reads the params file the run will use and reports every problem at once, before Prefect, MLflow or any
stage starts: unknown keys, wrong types and impossible values (``vlgrpo.config.config_problems``), reward
names that neither a built-in, a plugin file nor ``rewards.models`` provides, plugin files that are missing
or fail to import, and data, model and tokenizer paths that do not exist. It imports no torch, Prefect or
MLflow (a plugin file may import what it likes), so it answers in well under a second or two.

    from tasks.preflight import preflight
    cfg = preflight("params.yaml")      # the Config, or PreflightFailed listing every problem
"""
from __future__ import annotations

import re
from pathlib import Path

from vlgrpo.config import Config, ConfigError, RewardsConfig, config_from_dict, config_problems, read_params
from vlgrpo.io import under_root

# A Hugging Face hub id ("org/name" or "name"): not a local path, so it is not looked for on disk here.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class PreflightFailed(ConfigError):
    """The params file (or what it points at) has problems; ``problems`` lists each on one line."""

    def __init__(self, params: Path, problems: list[str]):
        self.problems = problems
        n = len(problems)
        super().__init__(f"{params}: {n} problem{'s' if n > 1 else ''}:\n  " + "\n  ".join(problems))


def preflight(params: str | Path = "params.yaml", root: str | Path | None = None) -> Config:
    """The Config of ``params`` when it and everything it names are usable; else PreflightFailed with all
    the problems. ``root`` (default: the params file's folder) is what relative paths are taken from."""
    params = Path(params)
    root = Path(root) if root is not None else params.resolve().parent
    raw = read_params(params)  # a missing or unparsable file is one problem; nothing else can be checked
    problems = [p.replace("params.yaml:", f"{params}:", 1).removeprefix(f"{params}: ")
                for p in config_problems(raw)]
    if problems:  # the rewards can still be checked when their own section is sound
        rewards = _rewards_section(raw)
        raise PreflightFailed(params, problems + (reward_problems(rewards, root) if rewards else []))
    cfg = config_from_dict(raw)
    problems = reward_problems(cfg.rewards, root) + path_problems(cfg, root)
    if problems:
        raise PreflightFailed(params, problems)
    return cfg


def _rewards_section(raw: object) -> RewardsConfig | None:
    section = raw.get("rewards", {}) if isinstance(raw, dict) else None
    try:
        return config_from_dict({"rewards": section}).rewards if isinstance(section, dict) else None
    except ConfigError:
        return None


def reward_problems(rc: RewardsConfig, root: Path) -> list[str]:
    """Plugin files that are missing or fail to import, and reward names nothing provides."""
    from vlgrpo.rewards import REWARDS, PluginError, load_plugins

    out = []
    for p in rc.plugins:
        try:
            load_plugins([under_root(root, p)])
        except PluginError as e:
            out.append(f"rewards.plugins: {e}")
    known = set(REWARDS) | set(rc.models) | set(rc.remote) | set(rc.judges)
    for name in rc.weights:
        if name not in known:
            out.append(f"rewards.weights.{name}: unknown reward {name!r}; known: {', '.join(sorted(known))} "
                       "(more come from rewards.plugins, rewards.models, rewards.remote and rewards.judges)")
    return out


def path_problems(cfg: Config, root: Path) -> list[str]:
    """Files and folders the config names that are not there (hub ids are left to the stage that loads them)."""
    d, out = cfg.data, []
    wanted = []
    if d.source != "synthetic" and d.path:
        wanted.append(("data.path", d.path))
    if d.image_base:
        wanted.append(("data.image_base", d.image_base))
    wanted += [(f"data.image_roots[{i}]", r) for i, r in enumerate(d.image_roots)]
    if cfg.rewards.clip_model and "clip_score" in cfg.rewards.weights:
        wanted.append(("rewards.clip_model", cfg.rewards.clip_model))
    wanted += [(f"rewards.models.{n}", p) for n, p in cfg.rewards.models.items()]
    if cfg.train.launch.config:
        wanted.append(("train.launch.config", cfg.train.launch.config))
    engine = cfg.train.rollout
    if engine.engine == "vllm" and not engine.vllm.url:  # the engine is started from its own interpreter
        wanted.append(("train.rollout.vllm.python", engine.vllm.python))
    for key, rel in wanted:
        if not under_root(root, rel).exists():
            out.append(f"{key}: {rel} not found (relative paths are taken from {root})")
    for key, ref in (("base.model", cfg.base.model), ("validate.tokenizer", cfg.validate.tokenizer)):
        if ref and not under_root(root, ref).exists() and not _HUB_ID.match(ref):
            out.append(f"{key}: {ref} is neither a local folder (relative to {root}) nor a hub id")
    return out
