"""The base stage's pieces: batch schedule, targets, and both routes of run_base on a tiny manifest."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlgrpo.train.warm_start import _thin, batch_schedule, corpus_texts, run_base, warm_start_targets
from vlgrpo.data.manifest import Item, write_manifest
from tests.settings import tuned_config


def _item(i: int, split: str = "train", **kw) -> Item:
    return Item(id=f"i{i}", split=split, task=kw.pop("task", "color"), question="<image>What color?",
                images=[], **kw)


def test_batch_schedule_epochs_and_seed():
    s = batch_schedule(5, 2, 5, seed=0)
    assert [len(b) for b in s] == [2] * 5
    flat = [i for b in s for i in b]
    assert sorted(flat[:5]) == [0, 1, 2, 3, 4] and sorted(flat[5:10]) == [0, 1, 2, 3, 4]  # whole epochs
    assert s == batch_schedule(5, 2, 5, seed=0) and s != batch_schedule(5, 2, 5, seed=1)


def test_targets_and_corpus():
    items = [_item(0, solution="red"), _item(1, task="caption", references=["a red circle", "x"]),
             _item(2, task="caption"), _item(3, solution="2", system="Be brief.")]
    assert [(it.id, a) for it, a in warm_start_targets(items)] == [("i0", "red"), ("i1", "a red circle"),
                                                                    ("i3", "2")]
    assert list(corpus_texts(items)) == ["What color?", "red", "What color?", "a red circle", "x",
                                         "What color?", "What color?", "2", "Be brief."]


def test_thin_keeps_last_point():
    pts = [(i, float(i)) for i in range(1, 101)]
    thin = _thin(pts, 20)
    assert len(thin) == 20 and thin[0] == (5, 5.0) and thin[-1] == (100, 100.0)
    assert _thin(pts[:3], 20) == pts[:3]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    from vlgrpo.data.synthetic import generate

    root = tmp_path_factory.mktemp("proj")
    cfg = tuned_config({"data": {"num_train": 16, "num_val": 6, "num_test": 0}}).data
    (root / "data" / "img").mkdir(parents=True)
    items = []
    for it, img in generate(cfg):
        it.images = [f"img/{it.id}.png"]
        img.save(root / "data" / it.images[0])
        items.append(it)
    write_manifest(root / "data" / "manifest.jsonl", items)
    return root / "data" / "manifest.jsonl"


def test_run_base_tiny_then_load_route(manifest, tmp_path):
    root = manifest.parent.parent
    cfg = tuned_config({"data": {"num_train": 16, "num_val": 6, "num_test": 0},
                            "base": {"warmup_steps": 3, "batch_size": 4}})
    rep = run_base(cfg, root, Path("data/manifest.jsonl"), progress=False)
    assert rep["model"] == "tiny-qwen2.5-vl" and rep["steps"] == 3 and len(rep["loss_curve"]) == 3
    assert rep["val_items"] == 6 and 0.0 <= rep["val_accuracy"] <= 1.0
    assert sum(rep["val_accuracy_by_task"].values()) >= 0 and rep["out_dir"] == "models/base"
    assert (root / "models" / "base" / "model.safetensors").is_file()

    # A named checkpoint is loaded through the Auto classes and saved unchanged, with no training.
    cfg2 = tuned_config({"data": {"num_train": 16, "num_val": 6, "num_test": 0},
                             "base": {"model": str(root / "models" / "base"), "out_dir": str(tmp_path / "b2")}})
    rep2 = run_base(cfg2, root, manifest, progress=False)
    assert rep2["steps"] == 0 and rep2["params"] == rep["params"] and rep2["loss_curve"] == []
    assert rep2["val_accuracy"] == rep["val_accuracy"]
    assert rep2["val_accuracy_by_task"] == rep["val_accuracy_by_task"]
    assert (tmp_path / "b2" / "config.json").is_file()


def test_run_base_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.jsonl: manifest not found; run the data stage"):
        run_base(tuned_config({}), tmp_path, Path("data/manifest.jsonl"), progress=False)
