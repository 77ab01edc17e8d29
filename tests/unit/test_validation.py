"""The validate stage: one test per defect in a real-format fixture (exact line, severity, check), warnings,
the mixed file, COCO / Flickr30k / manifest inputs, the Great Expectations suite and the report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.` helpers under the pytest script

from tests.fixtures_data import make_coco, make_flickr, save_image, swift_row, write_jsonl  # noqa: E402
from vlgrpo.data.images import cache_image  # noqa: E402
from vlgrpo.data.manifest import Item  # noqa: E402
from vlgrpo.data.validation import (TEMPLATE_OVERHEAD, PromptCounter, check_file, format_summary,  # noqa: E402
                               validate_file)
from tests.settings import tuned_config  # noqa: E402


def make_cfg(**validate):
    return tuned_config({"validate": validate} if validate else {})


CFG = make_cfg()


def found(path, cfg=CFG):
    """(line, severity, check) of every finding, plus the findings themselves."""
    _, _, findings, _, _ = check_file(path, cfg)
    return [(f["line"], f["severity"], f["check"]) for f in findings], findings


@pytest.fixture
def ds(tmp_path):
    """A dataset folder with two good, distinct 56x56 images."""
    d = tmp_path / "ds"
    save_image(d / "images" / "a.png", seed=1)
    save_image(d / "images" / "b.png", seed=2)
    return d


def good(image="images/a.png", **kw):
    return swift_row(image=image, **kw)


def _write_bad_file(d: Path, name: str, data: bytes) -> str:
    (d / "images" / name).write_bytes(data)
    return f"images/{name}"


def case_rows(d: Path, case: str) -> list:
    """Line 1 is always a good row; line 2 carries the defect."""
    first = good(id="r1")
    if case == "invalid_json":
        return [first, '{"messages": [{"role": "user", "content": "<image>hi"}], "images": ["images/a.png"'] 
    if case == "missing_image":
        return [first, good("images/nope.png", id="r2")]
    if case == "empty_image":
        return [first, good(_write_bad_file(d, "empty.png", b""), id="r2")]
    if case == "truncated_image":
        data = (d / "images" / "b.png").read_bytes()
        return [first, good(_write_bad_file(d, "cut.png", data[: len(data) - 20]), id="r2")]
    if case == "not_an_image":
        return [first, good(_write_bad_file(d, "notes.png", b"just some text\n"), id="r2")]
    if case == "empty_solution":
        return [first, good("images/b.png", solution="  ", id="r2")]
    if case == "no_image":
        return [first, good(None, question="How many circles are there?", id="r2")]
    if case == "no_user_prompt":
        return [first, good("images/b.png", question="<image>  ", id="r2")]
    if case == "path_escape":
        save_image(d.parent / "outside.png", seed=9)
        return [first, good("../outside.png", id="r2")]
    if case == "path_escape_absolute":
        return [first, good(str(save_image(d.parent / "elsewhere" / "x.png", seed=9)), id="r2")]
    if case == "path_escape_symlink":
        (d / "images" / "link.png").symlink_to(save_image(d.parent / "elsewhere" / "y.png", seed=8))
        return [first, good("images/link.png", id="r2")]
    if case == "remote_url":
        return [first, good("https://example.org/cat.jpg", id="r2")]
    if case == "prompt_too_long":
        return [first, good("images/b.png", question="<image>" + "x" * 600, id="r2")]
    if case == "duplicate_id":
        return [first, good("images/b.png", id="r1", solution="3")]
    if case == "image_in_two_splits":
        return [good(id="r1", split="train"), good(id="r2", split="test", solution="5")]
    if case == "image_tag_mismatch":
        return [first, good("images/b.png", question="<image><image>Same colour?", id="r2")]
    raise AssertionError(case)


ERROR_CASES = ["invalid_json", "missing_image", "empty_image", "truncated_image", "not_an_image",
               "empty_solution", "no_image", "no_user_prompt", "path_escape", "remote_url", "prompt_too_long",
               "duplicate_id", "image_in_two_splits", "image_tag_mismatch"]


@pytest.mark.parametrize("case", ERROR_CASES + ["path_escape_absolute", "path_escape_symlink"])
def test_each_error_in_swift_jsonl(ds, case):
    path = write_jsonl(ds / "train.jsonl", case_rows(ds, case))
    got, findings = found(path)
    assert got == [(2, "error", case.removesuffix("_absolute").removesuffix("_symlink"))]
    assert str(path) in findings[0]["message"] and ":2:" in findings[0]["message"]
    assert set(findings[0]) == {"line", "severity", "check", "message"}


def test_decompression_bomb_by_pillow_limit(ds, monkeypatch):
    save_image(ds / "images" / "big.png", size=(112, 112))
    path = write_jsonl(ds / "t.jsonl", [good(id="r1"), good("images/big.png", id="r2")])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)   # 56x56 passes, 112x112 is over the limit
    assert found(path)[0] == [(2, "error", "decompression_bomb")]


def test_prompt_length_boundary_is_exact(ds):
    # system "Answer briefly." (15 bytes) + N text bytes + template overhead + 2 vision tags + 4 visual tokens
    # (56x56 image = 2x2 blocks of 28 px) must be <= 512.
    fixed = len("Answer briefly.") + TEMPLATE_OVERHEAD + 2 + 4
    n_ok = 512 - fixed
    path = write_jsonl(ds / "t.jsonl", [good(question="<image>" + "x" * n_ok, id="r1"),
                                        good("images/b.png", question="<image>" + "x" * (n_ok + 1), id="r2")])
    got, findings = found(path)
    assert got == [(2, "error", "prompt_too_long")]
    assert "prompt is 513 tokens (4 visual + 509 text" in findings[0]["message"]


def test_tokenizer_counts_text_when_configured(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["[UNK]", "Answer", "briefly.", "How", "many", "circles", "are", "there?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    counter = PromptCounter(make_cfg(tokenizer=str(tmp_path / "tok")))
    item = Item(id="a", split="train", task="count", question="<image>How many circles are there?",
                images=["a.png"], solution="1", system="Answer briefly.")
    assert counter.source == str(tmp_path / "tok")
    assert counter.text_tokens(item) == 2 + 5 + TEMPLATE_OVERHEAD + 2
    with pytest.raises(ValueError, match="validate.tokenizer: cannot load a tokenizer"):
        PromptCounter(make_cfg(tokenizer=str(tmp_path / "missing")))


def test_warnings_keep_the_row(ds):
    Image.new("L", (56, 56), 90).save(ds / "images" / "grey.png")
    save_image(ds / "images" / "wide.png", seed=3, size=(300, 200))
    save_image(ds / "images" / "tiny.png", seed=4, size=(20, 20))
    dup = good("images/b.png", id="r5")
    path = write_jsonl(ds / "w.jsonl", [good(id="r1"), good("images/grey.png", id="r2"),
                                        good("images/wide.png", id="r3"), good("images/tiny.png", id="r4"),
                                        dup, dup])
    kind, kept, findings, stats, _ = check_file(path, CFG)
    assert [(f["line"], f["severity"], f["check"]) for f in findings] == [
        (2, "warning", "converted_mode"), (3, "warning", "resized"), (4, "warning", "upscaled"),
        (6, "warning", "duplicate_row")]
    assert [c.item.id for c in kept] == ["r1", "r2", "r3", "r4", "r5"]   # the copy on line 6 is dropped
    assert stats == {"rows": 6, "error_rows": 0, "duplicates": 1}


def test_mixed_file_flags_exactly_the_bad_lines(ds):
    save_image(ds.parent / "outside.png")
    rows = [good(id="g1"), good("images/b.png", id="g2", solution="4"), "not json at all",
            good(id="g3", solution="1"), good("images/missing.png", id="b1"), good(id="g4", solution="0"),
            good(id="b2", solution=""), good("../outside.png", id="b3"), good(id="g5", solution="7")]
    path = write_jsonl(ds / "mixed.jsonl", rows)
    got, _ = found(path)
    assert sorted({line for line, sev, _ in got if sev == "error"}) == [3, 5, 7, 8]
    assert got == [(3, "error", "invalid_json"), (5, "error", "missing_image"), (7, "error", "empty_solution"),
                   (8, "error", "path_escape")]


def test_coco_defects_reported_at_entry_position(tmp_path):
    root = tmp_path / "coco"
    make_coco(root, [(1, "1.jpg", ["A cat."]), (2, "2.jpg", ["A dog."]), (3, "3.jpg", []),
                     (4, "4.jpg", ["A bird."])])
    (root / "val2017" / "2.jpg").unlink()
    got, findings = found(root / "annotations" / "captions_val2017.json")
    assert got == [(2, "error", "missing_image"), (3, "error", "empty_solution")]
    assert "captions_val2017.json:2:" in findings[0]["message"]


def test_flickr_defects(tmp_path):
    root = tmp_path / "f"
    make_flickr(root, [(0, "a.jpg", "train", ["x."]), (1, "b.jpg", "test", ["y."]), (2, "c.jpg", "val", ["z."])])
    doc = json.loads((root / "dataset_flickr30k.json").read_text())
    doc["images"][2]["filename"] = "a.jpg"                     # same picture as entry 1, other split
    doc["images"].append({"imgid": 3, "filename": "../../etc.jpg", "split": "train",
                          "sentences": [{"raw": "w."}]})
    (root / "dataset_flickr30k.json").write_text(json.dumps(doc))
    got, _ = found(root / "dataset_flickr30k.json")
    assert got == [(3, "error", "image_in_two_splits"), (4, "error", "path_escape")]


def test_broken_json_document_reports_parser_line(tmp_path):
    ann = make_coco(tmp_path / "coco", [(1, "1.jpg", ["A cat."])])
    ann.write_text('{"images": [\n  {"id": 1,\n   "file_name": "1.jpg"\n  ,,\n]}')
    assert found(ann)[0] == [(4, "error", "invalid_json")]


def _manifest(tmp_path, n=6):
    out = tmp_path / "data"
    items = []
    for i in range(n):
        img = Image.new("RGB", (56, 56), (i * 40, 10, 10))
        rel = cache_image(img, out / "cache")
        items.append(Item(id=f"m{i}", split=("train", "val", "test")[i % 3], task=("count", "caption")[i % 2],
                          question="<image>How many?", images=[rel], solution="2" if i % 2 == 0 else "",
                          references=[] if i % 2 == 0 else ["A red square."]))
    path = out / "manifest.jsonl"
    path.write_text("".join(it.to_json() + "\n" for it in items))
    return path, items


def test_manifest_fast_path_finds_damaged_cache(tmp_path):
    path, items = _manifest(tmp_path)
    cached = path.parent / items[1].images[0]
    cached.write_bytes(cached.read_bytes()[:-30])               # truncated in place
    (path.parent / items[4].images[0]).unlink()
    got, _ = found(path)
    assert got == [(2, "error", "truncated_image"), (5, "error", "missing_image")]


def test_validate_file_clean_manifest_writes_report_and_data_docs(tmp_path):
    path, _ = _manifest(tmp_path)
    report = tmp_path / "reports" / "validate.json"
    docs = tmp_path / "reports" / "data_docs"
    res = validate_file(path, CFG, report, docs)
    assert res.ok and res.rows == 6 and res.valid_rows == 6 and res.error_fraction == 0.0
    on_disk = json.loads(report.read_text())
    assert {"ok", "input", "rows", "valid_rows", "error_fraction", "counts", "findings",
            "expectations"} <= set(on_disk)
    assert on_disk["ok"] is True and on_disk["findings"] == [] and on_disk["counts"] == {}
    names = [e["expectation"] for e in on_disk["expectations"]]
    assert "expect_column_values_to_be_unique" in names and all(e["success"] for e in on_disk["expectations"])
    assert (docs / "index.html").is_file()
    pages = list(docs.glob("validations/**/*.html"))
    assert pages
    assert "validate OK" in format_summary(res)
    # The validation run is named after the data, not GE's `__none__`.
    assert [p.parent.parent.name for p in pages] == [f"{path.stem}-6-rows"]
    assert "__none__" not in (docs / "index.html").read_text()


def test_data_docs_load_nothing_from_the_network(tmp_path):
    """Every page's styles and scripts resolve to files of the site itself (docs_offline), so the pages render
    offline; the full check in a browser is tests/integration/test_dvc_pipeline.py's."""
    import re

    from vlgrpo.data.docs_offline import make_offline

    path, _ = _manifest(tmp_path)
    docs = tmp_path / "docs"
    validate_file(path, CFG, None, docs)
    pages = list(docs.rglob("*.html"))
    assert len(pages) == 3  # index, the suite, the validation run
    for page in pages:
        text = page.read_text()
        refs = re.findall(r'<(?:link|script)\b[^>]*?\b(?:href|src)="([^"]+)"', text)
        refs += re.findall(r'<img\b[^>]*?\bsrc="([^"]+)"', text, re.S)
        assert refs, page
        remote = [r for r in refs if r.startswith(("http:", "https:", "//"))]
        assert not remote, (page, remote)
        missing = [r for r in refs if not (page.parent / r).is_file()]
        assert not missing, (page, missing)
    assert "vlgrpo-table.js" in (docs / "index.html").read_text()
    assert make_offline(docs) == []          # idempotent: a second pass finds nothing left to replace


def test_validate_file_failures_and_threshold(ds, tmp_path):
    rows = [good(id="g1"), good("images/nope.png", id="b1"), good("images/b.png", id="g2", solution="1"),
            good(id="g3", solution="0")]
    path = write_jsonl(ds / "t.jsonl", rows)
    res = validate_file(path, CFG, tmp_path / "r.json")
    assert not res.ok and res.suite_success                  # the kept rows are fine; 1 error row of 4
    assert res.error_fraction == 0.25 and res.counts == {"missing_image": 1}
    assert res.findings[0]["line"] == 2
    summary = format_summary(res)
    assert "validate FAILED" in summary and "missing_image=1" in summary
    assert validate_file(path, make_cfg(max_error_fraction=0.25)).ok


def test_suite_fails_when_nothing_survives(ds):
    path = write_jsonl(ds / "t.jsonl", [good("images/nope.png", id="b1")])
    res = validate_file(path, make_cfg(max_error_fraction=1.0))
    assert not res.ok and not res.suite_success and res.valid_rows == 0
    failed = [e["expectation"] for e in res.expectations if not e["success"]]
    assert failed == ["expect_table_row_count_to_be_between"]


def test_remote_url_allowed_is_kept_and_charged_the_largest_image(ds):
    path = write_jsonl(ds / "t.jsonl", [good("https://example.org/cat.jpg", id="r1")])
    cfg = tuned_config({"data": {"allow_remote": True}})
    _, kept, findings, _, _ = check_file(path, cfg)
    assert findings == [] and len(kept) == 1
    assert kept[0].prompt_tokens == len("Answer briefly.") + len("How many circles are there?") \
        + TEMPLATE_OVERHEAD + 2 + 16                              # 112x112 budget = 4x4 visual tokens
