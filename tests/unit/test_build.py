"""The data stage: synthetic and imported builds write a manifest + content-addressed cache, atomically."""
from __future__ import annotations

import hashlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.` helpers under the pytest script

import vlgrpo.data.synthetic as synthetic  # noqa: E402
from tests.fixtures_data import make_coco, make_flickr, save_image, swift_row, write_jsonl  # noqa: E402
from vlgrpo.data.build import BuildError, build_dataset  # noqa: E402
from vlgrpo.data.manifest import read_manifest  # noqa: E402
from vlgrpo.data.validation import validate_file  # noqa: E402
from tests.settings import tuned_config

SMALL = {"num_train": 12, "num_val": 3, "num_test": 3,
         "task_mix": {"count": 1.0, "color": 1.0, "shape": 1.0, "exists": 1.0, "caption": 1.0}}


def cfg_with(**data):
    return tuned_config({"data": {**SMALL, **data}})


def test_synthetic_build_writes_manifest_and_cache(tmp_path):
    cfg = cfg_with()
    s = build_dataset(cfg, tmp_path)
    manifest = tmp_path / "data" / "manifest.jsonl"
    items = read_manifest(manifest)
    assert s["rows"] == len(items) == 18 and s["splits"] == {"test": 3, "train": 12, "val": 3}
    assert s["dropped_errors"] == 0 and s["findings"] == []
    assert sum(s["tasks"].values()) == 18 and set(s["tasks"]) <= {"count", "color", "shape", "exists", "caption"}
    for it in items:
        [rel] = it.images
        p = manifest.parent / rel
        assert hashlib.sha256(p.read_bytes()).hexdigest() == Path(rel).stem   # content-addressed
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (112, 112)
        assert it.scene is not None and it.question.startswith("<image>")
    assert s["images"] == len({it.images[0] for it in items})


def test_synthetic_build_is_deterministic(tmp_path):
    cfg = cfg_with(seed=3)
    build_dataset(cfg, tmp_path / "a")
    build_dataset(cfg, tmp_path / "b")
    a = (tmp_path / "a" / "data" / "manifest.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "data" / "manifest.jsonl").read_bytes()
    files = lambda r: sorted(p.relative_to(r).as_posix() for p in (r / "data" / "cache").rglob("*.png"))  # noqa: E731
    assert files(tmp_path / "a") == files(tmp_path / "b")
    build_dataset(cfg_with(seed=4), tmp_path / "c")
    assert (tmp_path / "c" / "data" / "manifest.jsonl").read_bytes() != a


def test_failure_midway_leaves_previous_manifest_intact(tmp_path, monkeypatch):
    build_dataset(cfg_with(), tmp_path)
    manifest = tmp_path / "data" / "manifest.jsonl"
    before = manifest.read_bytes()
    old_images = sorted((tmp_path / "data" / "cache").rglob("*.png"))
    real = synthetic.generate

    def broken(cfg):
        for n, pair in enumerate(real(cfg)):
            if n == 5:
                raise RuntimeError("disk on fire")
            yield pair

    monkeypatch.setattr(synthetic, "generate", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_dataset(cfg_with(seed=11), tmp_path)
    assert manifest.read_bytes() == before
    assert all(p.is_file() for p in old_images)               # nothing the old manifest needs was pruned
    assert not [p for p in manifest.parent.iterdir() if p.name.endswith(".tmp")]
    assert validate_file(manifest, cfg_with()).ok


def test_rebuild_prunes_unreferenced_images(tmp_path):
    build_dataset(cfg_with(), tmp_path)
    s = build_dataset(cfg_with(seed=5), tmp_path)
    on_disk = {p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data" / "cache").rglob("*")
               if p.is_file()}
    referenced = {rel for it in read_manifest(tmp_path / "data" / "manifest.jsonl") for rel in it.images}
    assert on_disk == referenced and s["pruned_images"] > 0


def test_jsonl_build_normalises_drops_errors_and_splits_by_image(tmp_path):
    ds = tmp_path / "raw"
    save_image(ds / "img" / "a.png", seed=1)
    Image.new("L", (300, 200), 60).save(ds / "img" / "grey.png")
    for i in range(30):
        save_image(ds / "img" / f"s{i}.png", seed=10 + i)
    rows = [swift_row("img/a.png", id="q1", difficulty=1), swift_row("img/a.png", id="q2", solution="4"),
            swift_row("img/grey.png", id="q3"), swift_row("img/missing.png", id="bad"),
            *[swift_row(f"img/s{i}.png", id=f"s{i}", solution=str(i)) for i in range(30)]]
    write_jsonl(ds / "train.jsonl", rows)
    cfg = tuned_config({"data": {"source": "jsonl", "path": "raw/train.jsonl", "val_fraction": 0.3,
                                     "test_fraction": 0.3}})
    s = build_dataset(cfg, tmp_path)
    items = {it.id: it for it in read_manifest(tmp_path / "data" / "manifest.jsonl")}
    assert s["dropped_errors"] == 1 and "bad" not in items and len(items) == 33
    assert s["counts"] == {"converted_mode": 1, "missing_image": 1, "resized": 1}
    assert items["q1"].extra == {"difficulty": 1} and items["q1"].task == "vqa"
    assert items["q1"].split == items["q2"].split              # one image, one split
    assert items["q1"].images == items["q2"].images
    assert Counter(it.split for it in items.values()).keys() == {"train", "val", "test"}
    with Image.open(tmp_path / "data" / items["q3"].images[0]) as im:
        assert im.mode == "RGB" and im.size == (112, 84)
        assert np.asarray(im)[0, 0].tolist() == [60, 60, 60]
    assert validate_file(tmp_path / "data" / "manifest.jsonl", cfg).ok


def test_coco_and_flickr_builds(tmp_path):
    make_coco(tmp_path / "coco", [(1, "1.jpg", ["A cat.", "A kitten."]), (2, "2.jpg", ["A dog."])])
    cfg = tuned_config({"data": {"source": "coco", "path": "coco", "split": "val2017", "out_dir": "dc"}})
    s = build_dataset(cfg, tmp_path)
    items = read_manifest(tmp_path / "dc" / "manifest.jsonl")
    assert s["rows"] == 2 and [it.references for it in items] == [["A cat.", "A kitten."], ["A dog."]]
    assert all(it.task == "caption" and it.images[0].startswith("cache/") for it in items)

    make_flickr(tmp_path / "f", [(0, "0.jpg", "train", ["A man."]), (1, "1.jpg", "restval", ["Kids."]),
                                 (2, "2.jpg", "test", ["Sea."])])
    cfg = tuned_config({"data": {"source": "flickr30k", "path": str(tmp_path / "f"), "out_dir": "df"}})
    s = build_dataset(cfg, tmp_path)
    assert s["splits"] == {"test": 1, "train": 2}


def test_build_with_no_valid_rows_raises_and_keeps_old(tmp_path):
    build_dataset(cfg_with(), tmp_path)
    before = (tmp_path / "data" / "manifest.jsonl").read_bytes()
    write_jsonl(tmp_path / "bad.jsonl", [swift_row("missing.png")])
    cfg = tuned_config({"data": {"source": "jsonl", "path": "bad.jsonl"}})
    with pytest.raises(BuildError, match="no valid rows out of 1"):
        build_dataset(cfg, tmp_path)
    assert (tmp_path / "data" / "manifest.jsonl").read_bytes() == before
