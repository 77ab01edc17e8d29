"""The config values the unit, slow and benchmark tests are sized with, where params.yaml differs.

The config classes' defaults are params.yaml's values (what `dvc repro` runs). The tests that build a
config from a few keys were written against smaller, faster settings: a mixed synthetic task with up to
three smaller shapes, a 60-step base warm start, 60 GRPO steps at temperature 1.0 with no reference model
(beta 0) and a checkpoint every 20 steps, all of them kept. These helpers build the config classes with
those values under whatever a test gives explicitly, so the tests keep their behaviour and run time.
"""
from __future__ import annotations

from typing import Any, Mapping

from vlgrpo.config import Config, DataConfig, SyntheticConfig, TrainConfig, config_from_dict

SYNTHETIC: dict[str, Any] = {"max_objects": 3, "min_object_size": 28, "max_object_size": 48}
DATA: dict[str, Any] = {"task_mix": {"count": 1.0, "color": 1.0, "shape": 1.0, "exists": 1.0, "caption": 0.0}}
BASE: dict[str, Any] = {"warmup_steps": 60, "learning_rate": 0.003}
TRAIN: dict[str, Any] = {"max_steps": 60, "temperature": 1.0, "beta": 0.0, "save_steps": 20,
                         "save_total_limit": None}


def tuned_raw(raw: Mapping[str, Any] | None) -> Any:
    """``raw`` (a params mapping) over the test settings; anything but a mapping is returned unchanged."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return raw
    out: dict[str, Any] = {k: v for k, v in raw.items()}
    for section, values in (("data", DATA), ("base", BASE), ("train", TRAIN)):
        given = out.get(section, {})
        if not isinstance(given, Mapping):
            continue
        merged = {**values, **given}
        if section == "data":
            syn = given.get("synthetic", {})
            merged["synthetic"] = {**SYNTHETIC, **syn} if isinstance(syn, Mapping) else syn
        out[section] = merged
    return out


def tuned_config(raw: Mapping[str, Any] | None = None) -> Config:
    """``config_from_dict`` with the test settings under ``raw``."""
    return config_from_dict(tuned_raw(raw))


def tuned_synthetic(**kw: Any) -> SyntheticConfig:
    return SyntheticConfig(**{**SYNTHETIC, **kw})


def tuned_data(**kw: Any) -> DataConfig:
    kw.setdefault("synthetic", tuned_synthetic())
    return DataConfig(**{**DATA, **kw})


def tuned_train(**kw: Any) -> TrainConfig:
    return TrainConfig(**{**TRAIN, **kw})
