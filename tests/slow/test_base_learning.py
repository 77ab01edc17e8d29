"""The base stage end to end on a small synthetic manifest: the warm start learns, the output reloads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlgrpo.data.manifest import read_manifest, write_manifest
from tests.settings import tuned_config

pytestmark = pytest.mark.slow


def _write_dataset(root: Path, data: dict) -> Path:
    """Synthetic items + images under ``root/data`` (the data stage's layout, without its cache)."""
    from vlgrpo.data.synthetic import generate

    cfg = tuned_config({"data": data}).data
    out = root / "data"
    (out / "img").mkdir(parents=True)
    items = []
    for it, img in generate(cfg):
        rel = f"img/{it.id}.png"
        img.save(out / rel)
        it.images = [rel]
        items.append(it)
    write_manifest(out / "manifest.jsonl", items)
    return out / "manifest.jsonl"


def test_warm_start_learns_colour_above_chance(tmp_path):
    """Colour-only questions, 4 colours: chance (or always the majority colour) is far below 0.6."""
    from vlgrpo.train.warm_start import run_base
    from vlgrpo.model.decoding import Decoding, generate_answers
    from vlgrpo.model.loading import load_model

    data = {"num_train": 256, "num_val": 64, "num_test": 0,
            "task_mix": {"count": 0.0, "color": 1.0, "shape": 0.0, "exists": 0.0, "caption": 0.0},
            "synthetic": {"min_objects": 1, "max_objects": 1, "min_object_size": 48, "max_object_size": 64}}
    manifest = _write_dataset(tmp_path, data)
    cfg = tuned_config({"data": data, "base": {"warmup_steps": 150, "batch_size": 16,
                                                   "learning_rate": 3e-3}})
    report = run_base(cfg, tmp_path, manifest, progress=False)

    val = read_manifest(manifest, "val")
    majority = max(sum(it.solution == c for it in val) for c in {it.solution for it in val}) / len(val)
    assert report["val_items"] == 64
    assert report["val_terminated"] == 1.0                      # the format is learned fully
    assert report["val_accuracy"] >= max(0.6, majority + 0.2), report
    assert set(report["val_accuracy_by_task"]) == {"color"}
    assert report["steps"] == 150 and 400_000 < report["params"] < 1_000_000

    # The saved directory is what later stages load: same answers as the report's model.
    model, processor = load_model(tmp_path / "models" / "base")
    comps = generate_answers(model, processor, val, manifest.parent,
                             Decoding(32, 8, cfg.data.min_pixels, cfg.data.max_pixels))
    from vlgrpo.data.answers import answers_match
    acc = sum(answers_match(c.text, it.solution) for c, it in zip(comps, val)) / len(val)
    assert round(acc, 4) == report["val_accuracy"]
    json.dumps(report)  # the caller writes it as reports/base.json


def test_warm_start_is_deterministic(tmp_path):
    """Same seed, same data -> bit-identical weights (CPU)."""
    from vlgrpo.train.warm_start import warm_start, warm_start_targets
    from vlgrpo.model.tiny_model import build_tiny
    from vlgrpo.config import TinyModelConfig

    manifest = _write_dataset(tmp_path, {"num_train": 32, "num_val": 0, "num_test": 0})
    train = read_manifest(manifest, "train")
    texts = [t for it in train for t in (it.text, it.solution)]
    states = []
    for _ in range(2):
        model, processor = build_tiny(texts, TinyModelConfig(), seed=3)
        cfg = tuned_config({"base": {"warmup_steps": 5, "batch_size": 8, "learning_rate": 3e-3, "seed": 3},
                                "data": {"min_pixels": 3136, "max_pixels": 12544}})
        log = warm_start(model, processor, warm_start_targets(train), manifest.parent, cfg, progress=False)
        states.append((log, {k: v.clone() for k, v in model.state_dict().items()}))
    (log1, s1), (log2, s2) = states
    assert log1 == log2 and len(log1) == 5
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
