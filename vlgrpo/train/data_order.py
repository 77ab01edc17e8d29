"""Which prompts each step sees, and their images: the data order and the per-slot random streams.

Every random draw for prompt slot k of step s (its G samples, its augmentation) comes from a generator seeded
by (seed, s, k), and the data order is a pure function of (seed, epoch): a resumed run replays exactly the
same draws, and the completions do not depend on how many processes share the step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vlgrpo.config import Config, TrainConfig
from vlgrpo.train.errors import TrainingError


def data_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the train items used in ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 7919]).permutation(num_items)


def step_prompt_indices(step: int, prompts_per_step: int, num_items: int, seed: int) -> list[int]:
    """Item indices of global step ``step`` (0-based): consecutive slots of the concatenated epoch orders."""
    out = []
    for k in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, pos = divmod(k, num_items)
        out.append(int(data_order(num_items, seed, epoch)[pos]))
    return out


def step_generator(seed: int, step: int, slot: int, stream: int) -> torch.Generator:
    """A generator private to (seed, step, prompt slot, stream): resume replays the same draws."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, step, slot, stream]).generate_state(1)[0]))
    return g


def drop_long_prompts(processor: Any, items: Sequence[Any], manifest_dir: Path, dcfg: Any,
                      max_tokens: int) -> tuple[list[Any], int]:
    """Items whose encoded prompt (image tokens included) fits ``max_tokens``, and how many were dropped
    (never truncated: that can cut image tokens)."""
    from vlgrpo.model import prompt_encoding

    keep, dropped = [], 0
    for start in range(0, len(items), 64):
        chunk = items[start:start + 64]
        enc = prompt_encoding.encode_prompts(processor, chunk, manifest_dir, dcfg.min_pixels, dcfg.max_pixels)
        for it, n in zip(chunk, enc["attention_mask"].sum(1).tolist()):
            if n <= max_tokens:
                keep.append(it)
            else:
                dropped += 1
    return keep, dropped


def load_train_items(cfg: Config, processor: Any, manifest: Path) -> tuple[list[Any], int]:
    """The manifest's train split (``train.subset`` of it), over-long prompts dropped → (items, dropped).

    Raises TrainingError when fewer than ``train.prompts_per_step`` prompts are left.
    """
    from vlgrpo.data.manifest import read_manifest

    tc = cfg.train
    items = read_manifest(manifest, split="train")
    if tc.subset is not None:
        items = items[:tc.subset]
    items, dropped = drop_long_prompts(processor, items, manifest.parent, cfg.data, tc.max_prompt_tokens)
    if len(items) < tc.prompts_per_step:
        raise TrainingError(f"{manifest}: only {len(items)} train prompts fit train.max_prompt_tokens="
                            f"{tc.max_prompt_tokens} ({dropped} dropped); need ≥ prompts_per_step "
                            f"({tc.prompts_per_step})")
    return items, dropped


def step_images(items: Sequence[Any], manifest_dir: Path, tc: TrainConfig, step: int, slots: Sequence[int]):
    """The images of this step's prompts: augmented (label-preserving) when ``train.augment`` is on, else
    None (the encoder then reads the cached originals)."""
    if not tc.augment:
        return None
    from vlgrpo.data import augment
    from vlgrpo.model import prompt_encoding

    out = []
    for it, k in zip(items, slots):
        rng = np.random.default_rng([tc.seed, step, k, 1])               # this prompt slot's own stream
        out.append([augment.augment_image(prompt_encoding.IMAGE_CACHE.get(manifest_dir / rel), it, rng)
                    for rel in it.images])
    return out
