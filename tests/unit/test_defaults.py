"""One set of defaults: the config classes' defaults are the shipped params.yaml's values, key for key.

So `vlgrpo validate --data` outside a project, a config built from a few keys and `dvc repro` all start
from the same values. A change to either side fails here, naming the dotted key and both values.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from vlgrpo.config import Config, config_from_dict, load_config

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def differences(given: object, default: object, key: str = "") -> list[str]:
    """Every key ``given`` (params.yaml, as YAML) sets whose value differs from ``default`` (``to_dict``)."""
    if isinstance(given, dict) and isinstance(default, dict) and not _is_value_map(key):
        out = []
        for k, v in given.items():
            dotted = f"{key}.{k}" if key else k
            if k not in default:
                out.append(f"{dotted}: in params.yaml, not a config field")
            else:
                out.extend(differences(v, default[k], dotted))
        return out
    return [] if given == default else [f"{key}: params.yaml {given!r}, config default {default!r}"]


def _is_value_map(key: str) -> bool:
    """Mapping-valued keys (task_mix, weights, ...): compared whole, since a missing entry matters too."""
    node: object = Config()
    for part in key.split(".") if key else []:
        node = getattr(node, part, None)
    return isinstance(node, dict)


def test_every_key_params_yaml_sets_is_the_config_default():
    raw = yaml.safe_load(PARAMS.read_text(encoding="utf-8"))
    defaults = Config().to_dict()
    assert set(raw) == set(defaults), "params.yaml's sections and the config's differ"
    found = differences(raw, defaults)
    assert not found, "config defaults differ from params.yaml:\n  " + "\n  ".join(found)
    assert len(differences({"train": {"max_steps": -1}}, defaults)) == 1    # the comparison sees a change


def test_the_empty_config_is_the_shipped_config():
    assert config_from_dict({}) == load_config(PARAMS)
    assert config_from_dict(None) == Config() == load_config(PARAMS)
