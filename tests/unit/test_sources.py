"""Source readers: ms-swift JSONL, COCO captions, Karpathy Flickr30k, our manifest; path confinement."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.` helpers under the pytest script

from tests.fixtures_data import make_coco, make_flickr, save_image, swift_row, write_jsonl  # noqa: E402
from vlgrpo.data.manifest import Item  # noqa: E402
from vlgrpo.data.sources import (CAPTION_PROMPT, PathResolver, assign_split, detect_kind,  # noqa: E402
                                 iter_coco_records, iter_flickr_records, iter_manifest_records,
                                 iter_swift_records)


def test_swift_row_becomes_an_item_with_extras(tmp_path):
    save_image(tmp_path / "images" / "a.png")
    row = swift_row(image="images/a.png", question="<image>How many circles?", solution="3",
                    difficulty="hard", bbox=[1, 2, 3, 4])
    row["messages"].append({"role": "assistant", "content": "ignored: solution column wins"})
    write_jsonl(tmp_path / "train.jsonl", [row])
    [rec] = list(iter_swift_records(tmp_path / "train.jsonl"))
    it = rec.item
    assert rec.line == 1 and rec.errors == []
    assert (it.id, it.split, it.task) == ("train-1", None, "vqa")
    assert it.question == "<image>How many circles?" and it.system == "Answer briefly."
    assert it.solution == "3" and it.extra == {"difficulty": "hard", "bbox": [1, 2, 3, 4]}
    assert rec.refs[0].path == (tmp_path / "images" / "a.png").resolve()


def test_swift_variants(tmp_path):
    save_image(tmp_path / "a.png")
    rows = [
        # dict image entries; no <image> tag: the image goes before the text, as ms-swift does
        {"messages": [{"role": "user", "content": "What colour?"}], "images": [{"path": "a.png"}],
         "solution": "red", "id": "x1", "split": "validation", "task": "color"},
        # OpenAI-style content parts; answer taken from the assistant turn when there is no solution column
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]},
                      {"role": "assistant", "content": "circle"}], "images": ["a.png"]},
        # two tags, one image
        {"messages": [{"role": "user", "content": "<image><image>Same?"}], "images": ["a.png"],
         "solution": "yes"},
    ]
    write_jsonl(tmp_path / "d.jsonl", rows)
    r1, r2, r3 = iter_swift_records(tmp_path / "d.jsonl")
    assert r1.item.question == "<image>What colour?" and r1.item.split == "val" and r1.item.task == "color"
    assert r1.item.id == "x1" and r1.errors == []
    assert r2.item.question == "<image>Shape?" and r2.item.solution == "circle" and r2.line == 2
    assert [e.check for e in r3.errors] == ["image_tag_mismatch"]


def test_coco_reader(tmp_path):
    ann = make_coco(tmp_path / "coco", [(42, "000000000042.jpg", ["A dog.", "A brown dog.", " "]),
                                        (7, "000000000007.jpg", ["Two cats."])])
    recs = list(iter_coco_records(tmp_path / "coco", split="val2017"))
    assert [r.line for r in recs] == [1, 2]                 # position in the `images` array
    a = recs[0].item
    assert (a.id, a.task, a.question, a.split) == ("coco-42", "caption", CAPTION_PROMPT, None)
    assert a.references == ["A dog.", "A brown dog."]     # all reference captions, blanks dropped
    assert recs[0].refs[0].path == (tmp_path / "coco" / "val2017" / "000000000042.jpg").resolve()
    assert [r.item.id for r in iter_coco_records(ann)] == ["coco-42", "coco-7"]  # the file works too


def test_flickr_reader(tmp_path):
    make_flickr(tmp_path / "f", [(0, "1000.jpg", "train", ["A man.", "A person."]),
                                 (1, "1001.jpg", "restval", ["Kids."]), (2, "1002.jpg", "test", ["Sea."])])
    recs = list(iter_flickr_records(tmp_path / "f"))
    assert [(r.line, r.item.id, r.item.split) for r in recs] == [
        (1, "flickr30k-0", "train"), (2, "flickr30k-1", "train"), (3, "flickr30k-2", "test")]
    assert recs[0].item.references == ["A man.", "A person."]
    assert recs[2].refs[0].path == (tmp_path / "f" / "flickr30k-images" / "1002.jpg").resolve()


def test_detect_kind(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", ["{broken", swift_row()])
    item = Item(id="a", split="train", task="count", question="<image>q", images=["x.png"], solution="1")
    (tmp_path / "manifest.jsonl").write_text(item.to_json() + "\n")
    ann = make_coco(tmp_path / "coco", [(1, "1.jpg", ["x"])], write_images=False)
    fl = make_flickr(tmp_path / "f", [(0, "0.jpg", "train", ["x"])], write_images=False)
    assert detect_kind(tmp_path / "s.jsonl") == "jsonl"
    assert detect_kind(tmp_path / "manifest.jsonl") == "manifest"
    assert detect_kind(ann) == detect_kind(tmp_path / "coco") == "coco"
    assert detect_kind(fl) == detect_kind(tmp_path / "f") == "flickr30k"
    with pytest.raises(ValueError, match="nope.jsonl: file not found"):
        detect_kind(tmp_path / "nope.jsonl")


def test_path_confinement(tmp_path):
    ds = tmp_path / "ds"
    save_image(ds / "ok.png")
    outside = save_image(tmp_path / "secret.png")
    os.symlink(outside, ds / "link.png")
    os.symlink(ds / "ok.png", ds / "inner_link.png")
    r = PathResolver(ds, ds, allow_remote=False)
    assert r("ok.png").path == (ds / "ok.png").resolve()
    assert r(str(ds / "ok.png")).path == (ds / "ok.png").resolve()    # absolute but inside: fine
    assert r("inner_link.png").path == (ds / "ok.png").resolve()      # link staying inside: fine
    for raw in ("../secret.png", str(outside), "link.png", "sub/../../secret.png"):
        res = r(raw)
        assert getattr(res, "check", None) == "path_escape", raw
    for raw in ("http://x.org/a.jpg", "https://x.org/a.jpg", "s3://bucket/a.jpg", "gs://b/a.png"):
        assert r(raw).check == "remote_url"
    allowed = PathResolver(ds, ds, allow_remote=True)("https://x.org/a.jpg")
    assert allowed.url == "https://x.org/a.jpg" and allowed.path is None


def test_manifest_reader_flags_schema(tmp_path):
    good = Item(id="a", split="train", task="count", question="<image>q", images=["i.png"], solution="1")
    bad_split = Item(id="b", split="dev", task="count", question="<image>q", images=["i.png"], solution="1")
    (tmp_path / "m.jsonl").write_text("\n".join([good.to_json(), "", json.dumps({"id": "c"}),
                                                 bad_split.to_json()]) + "\n")
    recs = list(iter_manifest_records(tmp_path / "m.jsonl"))
    assert [(r.line, [e.check for e in r.errors]) for r in recs] == [
        (1, []), (3, ["bad_schema"]), (4, ["bad_schema"])]             # blank line 2 is not a row


def test_assign_split_is_deterministic_and_proportional():
    splits = [assign_split(f"k{i}", 0.1, 0.2) for i in range(5000)]
    assert splits == [assign_split(f"k{i}", 0.1, 0.2) for i in range(5000)]
    frac = {s: splits.count(s) / 5000 for s in ("train", "val", "test")}
    assert abs(frac["test"] - 0.2) < 0.02 and abs(frac["val"] - 0.1) < 0.02
