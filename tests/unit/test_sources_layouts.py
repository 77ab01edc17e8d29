"""Every row layout ms-swift documents, written in its own shape (literal JSON, not through vlgrpo), read
by the data stage into the exact prompt turns, images and solution, and rendered by the processor's chat
template (the project's Qwen-style template of the tiny model, ``vlgrpo.model.tiny_model.CHAT_TEMPLATE``; a hub
checkpoint brings its own, which adds a default system turn) into the exact prompt text the model sees. Plus: what is warned about, refused, and how image
paths resolve (data.image_base / data.image_roots)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.` helpers under the pytest script

from tests.fixtures_data import save_image  # noqa: E402
from vlgrpo.config import Config, DataConfig, TinyModelConfig  # noqa: E402
from vlgrpo.data.build import build_dataset  # noqa: E402
from vlgrpo.data.manifest import read_manifest  # noqa: E402
from vlgrpo.data.sources import ReadOptions, detect_kind, iter_records, read_options  # noqa: E402
from vlgrpo.model.prompt_encoding import build_messages
from vlgrpo.model.tiny_model import build_tiny  # noqa: E402
from vlgrpo.data.validation import check_file, validate_file  # noqa: E402
from tests.settings import tuned_config, tuned_data

V = "<|vision_start|><|image_pad|><|vision_end|>"   # one 56x56 image = one merged visual token
SEEDS = {"a.png": 1, "b.png": 2, "c.png": 3}
PIX = dict(min_pixels=56 * 56, max_pixels=112 * 112)

# name -> (file name, rows exactly as the layout writes them, expected item, expected chat-template text)
LAYOUTS = {
    "messages_multi_turn": ("mm.jsonl", [
        {"messages": [{"role": "system", "content": "Answer with one word."},
                      {"role": "user", "content": "<image>What colour is this?"},
                      {"role": "assistant", "content": "red"},
                      {"role": "user", "content": "<image>And this one?"},
                      {"role": "assistant", "content": "green"}],
         "images": ["a.png", "b.png"], "solution": "green", "difficulty": 2}],
        dict(question="<image>And this one?", solution="green", system="Answer with one word.",
             images=["a.png", "b.png"], extra={"difficulty": 2},
             turns=[{"role": "user", "content": "<image>What colour is this?"},
                    {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "<image>And this one?"}]),
        "<|im_start|>system\nAnswer with one word.<|im_end|>\n"
        f"<|im_start|>user\n{V}What colour is this?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
        f"<|im_start|>user\n{V}And this one?<|im_end|>\n<|im_start|>assistant\n"),
    "messages_agent_tool_image": ("agent.jsonl", [
        {"tools": "[{\"type\": \"function\", \"function\": {\"name\": \"zoom\"}}]",
         "messages": [{"role": "user", "content": "<image>How many dots are there?"},
                      {"role": "tool_call", "content": "{\"name\": \"zoom\", \"arguments\": {\"x\": 10}}"},
                      {"role": "tool_response", "content": "{\"image\": \"<image>\"}"}],
         "images": ["a.png", "c.png"], "solution": "3"}],
        dict(question="<image>How many dots are there?", solution="3", system=None, images=["a.png", "c.png"],
             extra={"tools": "[{\"type\": \"function\", \"function\": {\"name\": \"zoom\"}}]"},
             turns=[{"role": "user", "content": "<image>How many dots are there?"},
                    {"role": "assistant",
                     "content": "<tool_call>\n{\"name\": \"zoom\", \"arguments\": {\"x\": 10}}\n</tool_call>"},
                    {"role": "tool", "content": "{\"image\": \"<image>\"}"}]),
        f"<|im_start|>user\n{V}How many dots are there?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"zoom\", \"arguments\": {\"x\": 10}}\n</tool_call><|im_end|>\n"
        f"<|im_start|>tool\n{{\"image\": \"{V}\"}}<|im_end|>\n<|im_start|>assistant\n"),
    "messages_openai_parts": ("parts.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "c.png"},
                                                   {"type": "text", "text": "Which colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]}],
        dict(question="<image>Which colour?", solution="blue", system=None, images=["c.png"], extra={}, turns=[]),
        f"<|im_start|>user\n{V}Which colour?<|im_end|>\n<|im_start|>assistant\n"),
    "llava": ("llava.json", [
        {"id": "llava-7", "image": "a.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat is the colour of the square?"},
                           {"from": "gpt", "value": "Red."}]}],
        dict(question="<image>\nWhat is the colour of the square?", solution="Red.", system=None,
             images=["a.png"], extra={}, turns=[], id="llava-7"),
        f"<|im_start|>user\n{V}\nWhat is the colour of the square?<|im_end|>\n<|im_start|>assistant\n"),
    "sharegpt": ("sharegpt.jsonl", [
        {"system": "Be terse.",
         "conversation": [{"human": "<image>Describe the picture.", "assistant": "A green square."},
                          {"human": "What colour is it?", "assistant": "green"}],
         "images": ["b.png"]}],
        dict(question="What colour is it?", solution="green", system="Be terse.", images=["b.png"], extra={},
             turns=[{"role": "user", "content": "<image>Describe the picture."},
                    {"role": "assistant", "content": "A green square."},
                    {"role": "user", "content": "What colour is it?"}]),
        f"<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n{V}Describe the picture.<|im_end|>\n"
        "<|im_start|>assistant\nA green square.<|im_end|>\n<|im_start|>user\nWhat colour is it?<|im_end|>\n"
        "<|im_start|>assistant\n"),
    "alpaca": ("alpaca.jsonl", [
        {"instruction": "Name the colour of the shape.", "input": "Answer in one word.", "output": "blue",
         "images": ["c.png"]}],
        dict(question="<image>Name the colour of the shape.\nAnswer in one word.", solution="blue", system=None,
             images=["c.png"], extra={}, turns=[]),
        f"<|im_start|>user\n{V}Name the colour of the shape.\nAnswer in one word.<|im_end|>\n"
        "<|im_start|>assistant\n"),
    "query_response_history": ("qr.jsonl", [
        {"system": "You count things.", "query": "<image>And here?", "response": "4",
         "history": [["<image>How many circles?", "2"]], "images": ["a.png", "b.png"]}],
        dict(question="<image>And here?", solution="4", system="You count things.", images=["a.png", "b.png"],
             extra={}, turns=[{"role": "user", "content": "<image>How many circles?"},
                              {"role": "assistant", "content": "2"},
                              {"role": "user", "content": "<image>And here?"}]),
        f"<|im_start|>system\nYou count things.<|im_end|>\n<|im_start|>user\n{V}How many circles?<|im_end|>\n"
        f"<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n{V}And here?<|im_end|>\n<|im_start|>assistant\n"),
    "problem_solution_r1v": ("r1v.jsonl", [
        {"image": "a.png", "problem": "How many objects are there? Answer in <answer> </answer> tags.",
         "solution": "<answer>1</answer>"}],
        dict(question="<image>How many objects are there? Answer in <answer> </answer> tags.",
             solution="<answer>1</answer>", system=None, images=["a.png"], extra={}, turns=[]),
        f"<|im_start|>user\n{V}How many objects are there? Answer in <answer> </answer> tags.<|im_end|>\n"
        "<|im_start|>assistant\n"),
    "problem_solution_query_key": ("query.jsonl", [
        {"images": ["b.png"], "query": "<image>Which shape is shown?", "solution": "square", "shape_id": 7}],
        dict(question="<image>Which shape is shown?", solution="square", system=None, images=["b.png"],
             extra={"shape_id": 7}, turns=[]),
        f"<|im_start|>user\n{V}Which shape is shown?<|im_end|>\n<|im_start|>assistant\n"),
}


def _write(path: Path, rows: list[dict]) -> Path:
    """Write rows the way the layout's own tools do: JSON lines, or a pretty-printed JSON array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _images(folder: Path) -> None:
    for name, seed in SEEDS.items():
        save_image(folder / name, seed=seed)


def _cfg(**data) -> Config:
    return tuned_config({"data": {"source": "jsonl", "path": "x", "val_fraction": 0.0,
                                      "test_fraction": 0.0, **data}})


@pytest.fixture(scope="module")
def processor():
    _, proc = build_tiny(["What colour is this? red green"], TinyModelConfig(), seed=0)
    return proc


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_reads_builds_and_renders_exactly(name, tmp_path, processor):
    file_name, rows, want, chat = LAYOUTS[name]
    ds = tmp_path / "ds"
    _images(ds)
    src = _write(ds / file_name, rows)
    assert detect_kind(src) == "jsonl"

    # validation: every row valid, nothing to report
    kind, kept, findings, stats, _ = check_file(src, _cfg())
    assert stats["error_rows"] == 0 and len(kept) == len(rows)
    warnings = [f["check"] for f in findings]
    assert warnings == (["ignored_tools"] if name == "messages_agent_tool_image" else [])

    # the data stage: the manifest holds the exact prompt turns, solution, and the images in order
    cfg = _cfg(path=str(src))
    summary = build_dataset(cfg, tmp_path)
    assert summary["rows"] == 1 and summary["dropped_errors"] == 0
    [it] = read_manifest(tmp_path / "data" / "manifest.jsonl")
    assert (it.question, it.solution, it.system, it.extra, it.turns) == (
        want["question"], want["solution"], want["system"], want["extra"], want["turns"])
    assert it.id == want.get("id", f"{src.stem}-{1 if src.suffix == '.jsonl' else 2}")
    assert len(it.images) == len(want["images"])
    for cached, original in zip(it.images, want["images"]):
        with Image.open(tmp_path / "data" / cached) as a, Image.open(ds / original) as b:
            assert a.tobytes() == b.convert("RGB").tobytes()  # 56x56 RGB: cached unchanged

    # the exact prompt text the model sees
    paths = [tmp_path / "data" / p for p in it.images]
    text = processor.apply_chat_template(build_messages(it, paths, **PIX), tokenize=False,
                                         add_generation_prompt=True)
    assert text == chat


def test_json_array_lines_and_broken_array(tmp_path):
    _images(tmp_path)
    rows = [{"image": "a.png", "problem": "Colour?", "solution": "red"},
            {"image": "b.png", "problem": "Shape?", "solution": "square"}]
    src = _write(tmp_path / "rows.json", rows)
    recs = list(iter_records(src))
    assert [r.line for r in recs] == [1, 2]            # the element's row in the array, not its line
    assert [r.item.solution for r in recs] == ["red", "square"] and all(not r.errors for r in recs)
    # A truncated array: rows before the damage are read, then one invalid_json finding, no exception.
    text = src.read_text()
    (tmp_path / "cut.json").write_text(text[: text.index('"Shape?"')])
    kind, kept, findings, stats, _ = check_file(tmp_path / "cut.json", _cfg())
    assert kind == "jsonl" and len(kept) == 1
    assert [(f["line"], f["check"]) for f in findings] == [(2, "invalid_json")]
    assert findings[0]["message"].startswith(f"{tmp_path / 'cut.json'} row 2: ")


@pytest.mark.parametrize("indent", [None, 2], ids=["json.dump default (one line)", "pretty-printed"])
def test_json_array_rows_are_numbered_by_position(tmp_path, indent):
    """``json.dump(rows, f)`` writes the array on one line: every row still gets its own id and position."""
    _images(tmp_path)
    rows = [{"image": "a.png", "problem": "Colour?", "solution": "red"},
            {"image": "b.png", "problem": "Shape?", "solution": "square"},
            {"image": "a.png", "problem": "Colour?", "solution": ""}]          # row 3: an empty solution
    src = tmp_path / "rows.json"
    with open(src, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=indent)
    assert (len(src.read_text().splitlines()) == 1) == (indent is None)
    recs = list(iter_records(src))
    assert [r.line for r in recs] == [1, 2, 3] and len({r.item.id for r in recs}) == 3
    _, kept, findings, _, _ = check_file(src, _cfg())
    assert len(kept) == 2
    assert [(f["line"], f["check"]) for f in findings] == [(3, "empty_solution")]
    assert findings[0]["message"].startswith(f"{src} row 3: ")


def test_nothing_dropped_silently(tmp_path):
    _images(tmp_path)
    rows = [
        {"messages": [{"role": "user", "content": "<image><audio>What happens?"}], "images": ["a.png"],
         "audios": ["clip.wav"], "solution": "it rolls"},
        {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
         "rejected_response": "blue", "images": ["b.png"]},
    ]
    src = _write(tmp_path / "w.jsonl", rows)
    r1, r2 = iter_records(src)
    assert r1.item.question == "<image>What happens?" and not r1.errors   # <audio> removed, row kept
    assert [w.check for w in r1.warnings] == ["ignored_audios"] and "1 audio(s) in 'audios'" in r1.warnings[0].message
    assert r2.item.solution == "red" and [w.check for w in r2.warnings] == ["ignored_rejected_response"]
    _, kept, findings, _, _ = check_file(src, _cfg())
    assert len(kept) == 2 and sorted(f["check"] for f in findings) == ["ignored_audios",
                                                                      "ignored_rejected_response"]
    assert findings[0]["message"].startswith(f"{src}:1: ")


def test_grounding_placeholders_refused_objects_column_kept(tmp_path):
    _images(tmp_path)
    rows = [
        {"messages": [{"role": "user", "content": "<image>Find the <ref-object> in the image"},
                      {"role": "assistant", "content": "<bbox>"}], "images": ["a.png"],
         "objects": {"ref": ["sheep"], "bbox": [[90.9, 160.8, 135, 212.8]], "bbox_type": "real"}},
        {"messages": [{"role": "user", "content": "<image>Where is the sheep? Give [x1, y1, x2, y2]."}],
         "images": ["b.png"], "solution": "[91, 161, 135, 213]",
         "objects": {"ref": ["sheep"], "bbox": [[91, 161, 135, 213]]}},
    ]
    src = _write(tmp_path / "g.jsonl", rows)
    r1, r2 = iter_records(src)
    assert [e.check for e in r1.errors] == ["unsupported_grounding"]
    assert "model's own format" in r1.errors[0].message
    assert not r2.errors and r2.item.extra == {"objects": {"ref": ["sheep"], "bbox": [[91, 161, 135, 213]]}}


def test_unknown_layout_one_clear_error_and_format_forces(tmp_path):
    _images(tmp_path)
    src = _write(tmp_path / "u.jsonl", [{"picture": "a.png", "text": "hi", "label": 1}] * 3)
    recs = list(iter_records(src))
    assert len(recs) == 1 and recs[0].item is None and [e.check for e in recs[0].errors] == ["unknown_layout"]
    msg = recs[0].errors[0].message
    assert "keys seen: label, picture, text" in msg
    for layout in ("messages", "llava", "sharegpt", "alpaca", "query_response", "problem_solution"):
        assert layout in msg
    # data.columns renames, then the layout is found
    opts = read_options(tuned_data(columns={"picture": "image", "text": "problem", "label": "solution"}))
    [r] = list(iter_records(_write(tmp_path / "one.jsonl", [{"picture": "a.png", "text": "hi", "label": 1}]),
                            opts=opts))
    assert (r.item.question, r.item.solution, r.errors) == ("<image>hi", "1", [])
    # data.format forces a layout; rows that do not fit say what is missing
    rows = [{"query": "<image>Colour?", "solution": "red", "images": ["a.png"]}]
    [r] = list(iter_records(_write(tmp_path / "f.jsonl", rows), opts=ReadOptions(format="alpaca")))
    assert r.item.question == "<image>" and r.item.solution == "red"  # alpaca reads instruction/input only
    [r] = list(iter_records(tmp_path / "f.jsonl", opts=ReadOptions(format="problem_solution")))
    assert r.item.question == "<image>Colour?" and not r.errors


def test_validate_report_for_unknown_layout_and_unreadable_source(tmp_path):
    src = _write(tmp_path / "u.jsonl", [{"picture": "a.png"}])
    res = validate_file(src, _cfg())
    assert not res.ok and res.counts == {"unknown_layout": 1} and res.rows == 1
    (tmp_path / "folder").mkdir()
    res = validate_file(tmp_path / "folder", _cfg())
    assert not res.ok and res.kind == "unknown" and res.counts == {"unreadable_source": 1}
    assert "neither a COCO root" in res.findings[0]["message"]


def test_image_roots_and_base_resolution_order(tmp_path, monkeypatch):
    shared, ds, base = tmp_path / "shared", tmp_path / "ds", tmp_path / "base"
    save_image(shared / "coco" / "x.png", seed=5)
    save_image(ds / "x.png", seed=6)
    save_image(base / "x.png", seed=7)
    save_image(ds / "only_here.png", seed=8)
    rows = [{"image": str(shared / "coco" / "x.png"), "problem": "A?", "solution": "a"},
            {"image": "../shared/coco/x.png", "problem": "B?", "solution": "b"},
            {"image": "coco/x.png", "problem": "C?", "solution": "c"},
            {"image": "x.png", "problem": "D?", "solution": "d"},
            {"image": "only_here.png", "problem": "E?", "solution": "e"}]
    src = _write(ds / "rows.jsonl", rows)

    # default: confined to the dataset folder
    recs = list(iter_records(src))
    assert [[e.check for e in r.errors] for r in recs] == [["path_escape"], ["path_escape"], [], [], []]
    assert "data.image_roots" in recs[0].errors[0].message
    assert recs[3].refs[0].path == (ds / "x.png").resolve()

    # image_roots lets absolute and ../ paths into them through, and relative paths are looked up there too
    monkeypatch.chdir(tmp_path)
    opts = read_options(tuned_data(image_roots=("shared", str(shared / "coco"))))
    recs = list(iter_records(src, opts=opts))
    assert all(not r.errors for r in recs)
    assert [r.refs[0].path for r in recs[:3]] == [(shared / "coco" / "x.png").resolve()] * 3
    assert recs[3].refs[0].path == (ds / "x.png").resolve()          # the dataset folder before the roots

    # image_base comes first, the dataset folder next; an escape outside every allowed folder stays an error
    opts = read_options(tuned_data(image_base="base"), root=tmp_path)
    recs = list(iter_records(src, opts=opts))
    assert recs[3].refs[0].path == (base / "x.png").resolve()
    assert recs[4].refs[0].path == (ds / "only_here.png").resolve()
    assert [e.check for e in recs[0].errors] == ["path_escape"]


HOSTILE_ROWS = [
    {"messages": "not a list", "images": ["a.png"]},
    {"messages": [{"role": "wizard", "content": "<image>hi"}], "images": ["a.png"], "solution": "x"},
    {"messages": [{"role": "user", "content": "<image>hi"}], "images": 3, "solution": "x"},
    {"messages": [{"role": "user", "content": "<image>hi"}], "images": [{"nope": 1}], "solution": "x"},
    {"messages": ["just a string"], "images": ["a.png"], "solution": "x"},
]
HOSTILE_FILES = {
    "empty.jsonl": b"",
    "garbage.jsonl": b"\xff\xfe\x00garbage\n{not json\n",
    "number.json": b"42",
    "bom_array.json": b"\xef\xbb\xbf[" + json.dumps({"image": "a.png", "problem": "hi", "solution": "x"}).encode()
                      + b"]",
    "one_object.json": json.dumps({"image": "a.png", "problem": "hi", "solution": "x"}, indent=2).encode(),
    "sharegpt_bad.jsonl": (json.dumps({"conversation": [{"human": "<image>hi"}, "x"], "images": ["a.png"]})
                           + "\n").encode(),
    "qr_bad.jsonl": (json.dumps({"query": "<image>hi", "response": "x", "history": {"a": 1},
                                 "images": ["a.png"]}) + "\n").encode(),
    "junk.arrow": b"ARROW1 junk",
}


def test_hostile_inputs_are_findings_never_exceptions(tmp_path):
    _images(tmp_path)
    _write(tmp_path / "rows.jsonl", HOSTILE_ROWS)
    _, kept, findings, stats, _ = check_file(tmp_path / "rows.jsonl", _cfg())
    assert not kept and stats["error_rows"] == len(HOSTILE_ROWS)
    assert {f["line"] for f in findings} == {1, 2, 3, 4, 5}
    assert {f["line"] for f in findings if f["check"] == "bad_schema"} == {1, 2, 3, 4, 5}
    for name, data in HOSTILE_FILES.items():
        (tmp_path / name).write_bytes(data)
        kind, kept, findings, stats, _ = check_file(tmp_path / name, _cfg())
        if name in ("bom_array.json", "one_object.json"):   # valid: one row each
            assert (len(kept), findings) == (1, []), name
        else:
            assert not kept and stats["rows"] in (0, 1, 2) and (findings or stats["rows"] == 0), name
    _, _, findings, _, _ = check_file(tmp_path / "missing.jsonl", _cfg())
    assert [f["check"] for f in findings] == ["unreadable_source"]


def test_config_formats_are_the_layouts():
    import typing

    from vlgrpo.data.layouts import LAYOUTS as READ
    assert typing.get_args(typing.get_type_hints(DataConfig)["format"]) == ("auto", *READ)


def test_validate_command_on_every_layout_and_hostile_file_prints_no_traceback(tmp_path, monkeypatch, capsys):
    """The acceptance as a user meets it: `vlgrpo validate --data FILE` (from a folder with no params.yaml) on
    each layout's file says OK (exit 0), and on each hostile file one error line (exit 1); never a traceback."""
    from flows.cli import main

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for name, (file_name, rows, _, _) in LAYOUTS.items():
        ds = tmp_path / name
        _images(ds)
        assert main(["validate", "--data", str(_write(ds / file_name, rows))]) == 0, name
        err = capsys.readouterr().err
        assert "validate OK" in err and "Traceback" not in err, (name, err)
    hostile = tmp_path / "hostile"
    _images(hostile)
    files = {**HOSTILE_FILES, "rows.jsonl": "".join(json.dumps(r) + "\n" for r in HOSTILE_ROWS).encode()}
    for name, data in files.items():
        (hostile / name).write_bytes(data)
        code = main(["validate", "--data", str(hostile / name)])
        err = capsys.readouterr().err
        assert "Traceback" not in err, (name, err)
        if name in ("bom_array.json", "one_object.json"):   # valid: one row each
            assert code == 0, (name, err)
        else:
            assert code == 1 and err.count("vlgrpo validate: error:") == 1, (name, err)
