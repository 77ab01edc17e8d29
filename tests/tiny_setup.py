"""Shared set-up of the unit tests that need a tiny project on disk: synthetic scenes, a manifest, a base model."""
from __future__ import annotations

from pathlib import Path

from vlgrpo import modeling
from vlgrpo.config import Config, DataConfig
from vlgrpo.data.build import build_dataset
from vlgrpo.data.manifest import Item, read_manifest


def write_scenes(root: Path, n: int) -> list[Item]:
    """``n`` synthetic scene items with their images written under ``root/img`` (paths relative to ``root``)."""
    from vlgrpo.data.synthetic import generate

    (root / "img").mkdir()
    items = []
    for it, img in generate(DataConfig(num_train=n, num_val=0, num_test=0)):
        rel = f"img/{it.id}.png"
        img.save(root / rel)
        it.images = [rel]
        items.append(it)
    return items


def tiny_project(root: Path, cfg: Config, plugin: str) -> Path:
    """A project folder: a reward plugin (``plugin.py``), the data stage's manifest, ``models/base``."""
    (root / "plugin.py").write_text(plugin)
    build_dataset(cfg, root)
    items = read_manifest(root / "data/manifest.jsonl")
    model, proc = modeling.build_tiny([it.question + " " + it.solution for it in items], cfg.base.tiny, 0)
    modeling.save_model(model, proc, root / "models/base")
    return root
