"""Hugging Face datasets as a source: folders written by ``save_to_disk`` and ``to_parquet`` files made here
with the real ``datasets`` library (image columns as PIL images, paths and bytes), good and broken."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from PIL import Image as PILImage

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.` helpers under the pytest script

from tests.fixtures_data import color, save_image  # noqa: E402
from vlgrpo.config import Config  # noqa: E402
from vlgrpo.data.build import build_dataset  # noqa: E402
from vlgrpo.data.manifest import read_manifest  # noqa: E402
from vlgrpo.data.sources import detect_kind, iter_records  # noqa: E402
from vlgrpo.data.validation import check_file, validate_file  # noqa: E402
from tests.settings import tuned_config

datasets = pytest.importorskip("datasets")
Features, HFImage, Value = datasets.Features, datasets.Image, datasets.Value


def _pil(seed: int) -> PILImage.Image:
    return PILImage.new("RGB", (56, 56), color(seed))


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    _pil(seed).save(buf, format="PNG")
    return buf.getvalue()


def _cfg(**data) -> Config:
    return tuned_config({"data": {"source": "hf", "path": "x", "val_fraction": 0.0, "test_fraction": 0.0,
                                      **data}})


def _r1v(n: int = 3) -> "datasets.Dataset":
    """The clevr_cogen / multimodal-open-r1 layout: image (PIL) + problem + solution + an extra column."""
    return datasets.Dataset.from_dict(
        {"image": [_pil(i) for i in range(n)], "problem": [f"How many objects in scene {i}?" for i in range(n)],
         "solution": [f"<answer>{i}</answer>" for i in range(n)], "difficulty": list(range(n))},
        features=Features({"image": HFImage(), "problem": Value("string"), "solution": Value("string"),
                           "difficulty": Value("int64")}))


def test_save_to_disk_builds_the_manifest(tmp_path):
    folder = tmp_path / "clevr"
    _r1v().save_to_disk(str(folder))
    assert detect_kind(folder) == "hf"
    _, kept, findings, stats, _ = check_file(folder, _cfg())
    assert (stats["rows"], stats["error_rows"], findings) == (3, 0, [])
    summary = build_dataset(_cfg(path=str(folder)), tmp_path)
    assert summary["rows"] == 3
    items = sorted(read_manifest(tmp_path / "data" / "manifest.jsonl"), key=lambda it: it.extra["difficulty"])
    for i, it in enumerate(items):
        assert (it.question, it.solution, it.extra, it.id) == (
            f"<image>How many objects in scene {i}?", f"<answer>{i}</answer>", {"difficulty": i}, f"clevr-{i + 1}")
        with PILImage.open(tmp_path / "data" / it.images[0]) as im:
            assert im.convert("RGB").tobytes() == _pil(i).tobytes()


def test_parquet_paths_and_bytes_and_column_mapping(tmp_path):
    save_image(tmp_path / "pq" / "imgs" / "a.png", seed=4)
    ds = datasets.Dataset.from_dict({"img": ["imgs/a.png", "imgs/a.png"], "q": ["Colour?", "Colour again?"],
                                     "a": ["red", "red"]})
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    assert detect_kind(tmp_path / "pq" / "train.parquet") == detect_kind(tmp_path / "pq") == "hf"
    cfg = _cfg(columns={"img": "image", "q": "question", "a": "answer"})
    recs = list(iter_records(tmp_path / "pq" / "train.parquet", opts=_opts(cfg)))
    assert [(r.line, r.item.question, r.item.solution, r.errors) for r in recs] == [
        (1, "<image>Colour?", "red", []), (2, "<image>Colour again?", "red", [])]
    assert recs[0].refs[0].path == (tmp_path / "pq" / "imgs" / "a.png").resolve()
    # question/answer columns (no renaming needed) with images as raw bytes
    datasets.Dataset.from_dict({"image": [_png(1)], "question": ["Shape?"], "answer": ["circle"]}).to_parquet(
        str(tmp_path / "bytes.parquet"))
    _, kept, findings, _, _ = check_file(tmp_path / "bytes.parquet", _cfg())
    assert findings == [] and kept[0].item.solution == "circle" and kept[0].images[0].width == 56


def test_dataset_dict_splits(tmp_path):
    dd = datasets.DatasetDict({"train": _r1v(2), "validation": _r1v(1), "test": _r1v(1)})
    dd.save_to_disk(str(tmp_path / "dd"))
    recs = list(iter_records(tmp_path / "dd"))
    assert [r.item.split for r in recs] == ["train", "train", "val", "test"]
    assert [r.line for r in recs] == [1, 2, 3, 4]


def test_broken_datasets_give_findings_with_row_numbers(tmp_path):
    # undecodable image bytes in row 2, a wrong type (a number as the problem) in row 3
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(1), "path": None}, {"bytes": b"not an image", "path": None},
                   {"bytes": _png(3), "path": None}],
         "problem": ["Colour?", "Colour?", "Colour?"], "solution": ["red", "green", "blue"]},
        features=Features({"image": HFImage(), "problem": Value("string"), "solution": Value("string")}))
    ds.save_to_disk(str(tmp_path / "bad_img"))
    _, kept, findings, stats, _ = check_file(tmp_path / "bad_img", _cfg())
    assert [(f["line"], f["check"]) for f in findings] == [(2, "not_an_image")] and len(kept) == 2

    datasets.Dataset.from_dict({"image": [_png(1), _png(2)], "problem": [1, 2], "solution": ["a", "b"]}
                               ).to_parquet(str(tmp_path / "types.parquet"))
    _, kept, findings, _, _ = check_file(tmp_path / "types.parquet", _cfg())
    assert [(f["line"], f["check"]) for f in findings] == [(1, "bad_schema"), (1, "no_user_prompt"),
                                                           (2, "bad_schema"), (2, "no_user_prompt")]
    assert "'problem' must be text, got int" in findings[0]["message"] and not kept

    # missing columns: no prompt column at all -> one unknown_layout; no solution column -> per row
    datasets.Dataset.from_dict({"image": [_png(1)], "caption_text": ["x"]}).to_parquet(str(tmp_path / "np.parquet"))
    _, _, findings, _, _ = check_file(tmp_path / "np.parquet", _cfg())
    assert [f["check"] for f in findings] == ["unknown_layout"] and "caption_text, image" in findings[0]["message"]
    datasets.Dataset.from_dict({"image": [_png(1)], "problem": ["Colour?"]}).to_parquet(str(tmp_path / "ns.parquet"))
    _, _, findings, _, _ = check_file(tmp_path / "ns.parquet", _cfg())
    assert ("no solution column" in findings[0]["message"] and findings[0]["line"] == 1)

    # not a parquet file at all: one invalid_dataset finding, and validate reports instead of raising
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    res = validate_file(tmp_path / "junk.parquet", _cfg())
    assert not res.ok and res.counts == {"invalid_dataset": 1}


def _opts(cfg: Config):
    from vlgrpo.data.sources import read_options
    return read_options(cfg.data)
