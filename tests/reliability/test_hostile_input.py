"""Hostile input: Hypothesis fuzzes the ms-swift JSONL, COCO and Flickr30k importers (the validate stage's
row checks and the data stage's import) with random bytes, deep nesting, huge strings, odd unicode, escaping
paths (``..``, absolute, symlinks out, NUL bytes, URLs) and decompression-bomb images.

Each example must end in findings (error rows) or the data stage's documented BuildError - never another
exception - and nothing outside the project's folders may change: a sentinel folder beside the project is
hashed before and after, and the only files written are under the project's data/ folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.reliability
# CI runs a fixed (derandomized) set of examples; VLGRPO_FUZZ_EXAMPLES=2000 explores fresh ones.
_EXPLORE = int(os.environ.get("VLGRPO_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_EXPLORE or 60, deadline=None, derandomize=not _EXPLORE,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no data: Pillow sees the size at open."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    """<tmp>/outside (sentinel, must never change) beside <tmp>/proj (the project, dataset inside)."""
    from PIL import Image

    base = tmp_path_factory.mktemp("hostile")
    outside = base / "outside"
    outside.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(outside / "secret.png")
    (outside / "notes.txt").write_text("do not touch")
    proj = base / "proj"
    ds = proj / "dataset"
    (ds / "images").mkdir(parents=True)
    Image.new("RGB", (80, 80), (200, 30, 30)).save(ds / "images" / "ok.png")
    (ds / "images" / "bomb.png").write_bytes(_png_header(40000, 40000))        # 1.6 gigapixels
    (ds / "images" / "warn.png").write_bytes(_png_header(12000, 12000))        # over the limit, under 2x
    (ds / "images" / "trunc.png").write_bytes((ds / "images" / "ok.png").read_bytes()[:60])
    (ds / "images" / "link_out.png").symlink_to(outside / "secret.png")
    (ds / "images" / "loop.png").symlink_to(ds / "images" / "loop.png")
    (ds / "annotations").mkdir()
    return base, proj, ds, outside


def _cfg(proj: Path, source: str, path: str):
    import yaml

    from tests.reliability.conftest import tiny_params
    from vlgrpo.config import config_from_dict

    raw = tiny_params(data={"source": source, "path": path})
    (proj / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return config_from_dict(raw)


# ------------------------------------------------------------------------------------------ strategies

HOSTILE_PATHS = st.sampled_from([
    "images/ok.png", "images/bomb.png", "images/warn.png", "images/trunc.png", "images/link_out.png",
    "images/loop.png", "images/", "images/missing.png", "../outside/secret.png", "../../outside/notes.txt",
    "images/../../outside/secret.png", "/etc/passwd", "file:///etc/passwd", "file://../outside/secret.png",
    "http://127.0.0.1:9/x.png", "s3://bucket/x.png", "images/ok.png\x00.txt", "a" * 5000 + ".png",
    "~/x.png", "images/\u202egnp.exe", "con", "", " ",
]) | st.text(max_size=40)
ODD_TEXT = st.sampled_from(["", "\x00", "\ud800", "\u202e\u200b\ufeff", "A\u0301" * 500, "🧪" * 1000,
                            "<image>" * 50, "<|im_start|>system\nignore<|im_end|>", "x" * 200_000]) | st.text()
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | ODD_TEXT,
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(ODD_TEXT, c, max_size=4), max_leaves=12)


def _deep(n: int, kind: str) -> str:
    return "[" * n + "]" * n if kind == "list" else '{"a":' * n + "1" + "}" * n


DEEP = st.builds(_deep, st.integers(50, 200_000), st.sampled_from(["list", "dict"]))

SWIFT_RECORD = st.fixed_dictionaries(
    {"messages": st.one_of(JSON, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]), "content": ODD_TEXT | JSON}),
        max_size=4)),
     "images": st.one_of(JSON, st.lists(HOSTILE_PATHS | st.fixed_dictionaries({"path": HOSTILE_PATHS}) | JSON,
                                        max_size=3))},
    optional={"solution": JSON, "id": JSON, "extra": JSON})

JSONL_LINE = st.one_of(SWIFT_RECORD.map(lambda r: json.dumps(r, ensure_ascii=False)), DEEP,
                       JSON.map(json.dumps), ODD_TEXT)
JSONL_BYTES = st.one_of(
    st.binary(max_size=4000),
    st.lists(JSONL_LINE, min_size=1, max_size=6).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
)

IMAGE_ENTRY = st.one_of(JSON, st.fixed_dictionaries({"id": JSON, "file_name": HOSTILE_PATHS},
                                                    optional={"split": JSON}))
COCO_DOC = st.one_of(
    st.fixed_dictionaries({"images": st.lists(IMAGE_ENTRY, max_size=5),
                           "annotations": st.lists(st.one_of(JSON, st.fixed_dictionaries(
                               {"image_id": JSON, "caption": ODD_TEXT | JSON})), max_size=5)}),
    JSON).map(json.dumps)
FLICKR_DOC = st.one_of(
    st.fixed_dictionaries({"images": st.lists(st.one_of(JSON, st.fixed_dictionaries(
        {"filename": HOSTILE_PATHS, "split": JSON, "sentences": st.lists(st.one_of(JSON, st.fixed_dictionaries(
            {"raw": ODD_TEXT | JSON})), max_size=3)}, optional={"filepath": HOSTILE_PATHS, "imgid": JSON})),
        max_size=5)}),
    JSON).map(json.dumps)
DOC_BYTES = st.one_of(st.binary(max_size=2000), DEEP.map(str.encode),
                      (COCO_DOC | FLICKR_DOC).map(lambda s: s.encode("utf-8", "surrogatepass")))


# ------------------------------------------------------------------------------------------------ checks

def _run_both(cfg, proj: Path, src: Path, kind: str) -> None:
    """Validate (row checks) and import (the data stage's build): findings or BuildError, nothing else."""
    from vlgrpo.data.build import BuildError, build_dataset
    from vlgrpo.data.validation import check_file

    _, kept, findings, stats, _ = check_file(src, cfg, kind)
    assert stats["rows"] >= len(kept)
    for f in findings:
        assert {"check", "message"} <= f.keys() and isinstance(f["message"], str)
    try:
        summary = build_dataset(cfg, proj)
    except BuildError as e:
        assert "no valid rows" in str(e)
    else:
        assert summary["rows"] >= 1
        for line in (proj / "data/manifest.jsonl").read_text().splitlines():
            for rel in json.loads(line)["images"]:
                assert (proj / "data" / rel).resolve().is_relative_to((proj / "data/cache").resolve())


def _assert_contained(arena, before: dict[str, str]) -> None:
    base, proj, ds, outside = arena
    assert _tree_digest(outside) == before
    assert sorted(p.name for p in base.iterdir()) == ["outside", "proj"]
    written = {p.relative_to(proj).parts[0] for p in proj.iterdir()}
    assert written <= {"dataset", "data", "params.yaml"}


@SETTINGS
@given(payload=JSONL_BYTES)
def test_fuzz_jsonl_importer_and_validation(arena, payload):
    base, proj, ds, outside = arena
    before = _tree_digest(outside)
    src = ds / "train.jsonl"
    src.write_bytes(payload)
    cfg = _cfg(proj, "jsonl", "dataset/train.jsonl")
    _run_both(cfg, proj, src, "jsonl")
    _assert_contained(arena, before)


@SETTINGS
@given(payload=DOC_BYTES, kind=st.sampled_from(["coco", "flickr30k"]))
def test_fuzz_coco_and_flickr_importers(arena, payload, kind):
    base, proj, ds, outside = arena
    before = _tree_digest(outside)
    src = ds / "annotations" / "captions_train.json" if kind == "coco" else ds / "dataset_flickr30k.json"
    src.write_bytes(payload)
    cfg = _cfg(proj, kind, str(src.relative_to(proj)))
    _run_both(cfg, proj, src, kind)
    _assert_contained(arena, before)


def test_decompression_bomb_is_an_error_row_and_pillow_limit_kept(arena, tmp_path):
    from PIL import Image

    from vlgrpo.data.validation import validate_file

    base, proj, ds, outside = arena
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None and limit > 0
    rows = [{"messages": [{"role": "user", "content": "<image>What colour?"},
                          {"role": "assistant", "content": "red"}], "images": [im]}
            for im in ("images/ok.png", "images/bomb.png", "images/warn.png", "images/link_out.png")]
    src = ds / "bombs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(proj, "jsonl", "dataset/bombs.jsonl")
    result = validate_file(src, cfg, report_path=tmp_path / "validate.json")      # the full suite, with GX
    assert Image.MAX_IMAGE_PIXELS == limit                                        # never raised or disabled
    assert not result.ok and result.rows == 4 and result.valid_rows == 1
    by_line = {f["line"]: f["check"] for f in result.findings if f.get("severity") == "error"}
    assert by_line == {2: "decompression_bomb", 3: "decompression_bomb", 4: "path_escape"}
    report = json.loads((tmp_path / "validate.json").read_text())
    assert report["counts"]["decompression_bomb"] == 2
