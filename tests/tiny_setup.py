"""Shared set-up of the unit tests that need a tiny project on disk: synthetic scenes, a manifest, a base model."""
from __future__ import annotations

from pathlib import Path

from vlgrpo.model import loading, tiny_model
from vlgrpo.config import Config
from vlgrpo.data.build import build_dataset
from vlgrpo.data.manifest import Item, read_manifest
from tests.settings import tuned_config, tuned_data


def write_scenes(root: Path, n: int) -> list[Item]:
    """``n`` synthetic scene items with their images written under ``root/img`` (paths relative to ``root``)."""
    from vlgrpo.data.synthetic import generate

    (root / "img").mkdir()
    items = []
    for it, img in generate(tuned_data(num_train=n, num_val=0, num_test=0)):
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
    model, proc = tiny_model.build_tiny([it.question + " " + it.solution for it in items], cfg.base.tiny, 0)
    loading.save_model(model, proc, root / "models/base")
    return root


# The small trainer settings the tiny-project training tests share: 2 prompts x 4 completions of 4 tokens, fp32,
# a checkpoint every step, no warm-up.
TINY_TRAIN = {"max_steps": 2, "prompts_per_step": 2, "num_generations": 4, "micro_batch_size": 4,
              "mixed_precision": "no", "max_completion_length": 4, "save_steps": 1, "learning_rate": 0.01,
              "warmup_ratio": 0.0}


def tiny_train_cfg(project: Path, weights: dict[str, float], num_val: int = 2, **train) -> Config:
    """The config of a tiny-project training test: 16 train items, ``num_val`` val and 2 test items, the
    project's ``plugin.py`` loaded, ``weights`` as rewards.weights and TINY_TRAIN updated with ``train``."""
    return tuned_config({"data": {"num_train": 16, "num_val": num_val, "num_test": 2},
                             "rewards": {"weights": weights, "plugins": [str(project / "plugin.py")]},
                             "train": {**TINY_TRAIN, **train}})


def update_saving_bytes(model, batch, tc) -> tuple[dict, int]:
    """One ``update_phase`` of ``model`` on ``batch`` -> (its metric sums, bytes of the tensors autograd saved
    for backward): what gradient checkpointing is meant to shrink."""
    import torch

    from vlgrpo.train.scoring import CompletionScorer
    from vlgrpo.train.update import update_phase

    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sums = update_phase(CompletionScorer(model), batch, tc)
    return sums, saved[0]
