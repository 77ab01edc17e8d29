"""The ``validate`` stage core: row-level checks plus a Great Expectations suite, one JSON report.

    from vlgrpo.data.validation import validate_file
    result = validate_file("data/manifest.jsonl", cfg, report_path=Path("reports/validate.json"),
                           data_docs_dir=Path("reports/data_docs"))
    print(format_summary(result), file=sys.stderr); sys.exit(0 if result.ok else 1)

``validate_file`` takes our manifest or any raw source (rows in any ms-swift layout as ``.jsonl`` or a ``.json``
array, a Hugging Face ``save_to_disk`` folder or parquet files, COCO captions JSON, Karpathy Flickr30k JSON;
see :mod:`vlgrpo.data.sources` for what "line" means in each). It never raises for bad data: a file or
folder it cannot read at all is one ``unreadable_source`` finding, an unknown row layout one
``unknown_layout`` finding naming the keys seen and the layouts supported.

Row checks give one finding per problem, ``{"line", "severity", "check", "message"}``:

- errors (the row is excluded): ``invalid_json``, ``invalid_dataset``, ``unreadable_source``,
  ``unknown_layout``, ``bad_schema``, ``missing_image``, ``empty_image``, ``truncated_image``,
  ``not_an_image``, ``decompression_bomb``, ``bad_aspect_ratio``, ``empty_solution``, ``no_image``,
  ``no_user_prompt``, ``image_tag_mismatch``, ``video_tag_mismatch``, ``missing_video``,
  ``corrupt_video`` (a video file that does not decode completely), ``video_frame_mismatch`` (frames of one video of different sizes),
  ``unsupported_grounding``, ``path_escape``, ``remote_url``, ``prompt_too_long``, ``duplicate_id``, ``image_in_two_splits``;
- warnings (the row is kept and repaired by the data stage): ``converted_mode``, ``resized``,
  ``upscaled``, ``duplicate_row`` (an exact copy of an earlier row; the copy is dropped), ``sampled_frames``
  (a video longer than ``data.video_max_frames``), and what a row carries that vlgrpo does not use:
  ``ignored_audios``, ``ignored_rejected_response``,
  ``ignored_tools``, ``unused_column``.

Prompt length = text tokens + visual tokens. Visual tokens are ``(h/b)*(w/b)`` of the image after
``smart_resize`` into ``data.min_pixels..data.max_pixels`` with sides multiples of ``b``, the pixel block of
one visual token read from ``base.model``'s processor (patch size x merge size: 28 for Qwen2-VL / Qwen2.5-VL
and the tiny default, 32 for Qwen3-VL; 28 when ``base.model`` is null or a hub id). A video's are ``ceil(F/2)``
times those of one of its F frames (two frames per temporal patch), each frame fitted into
``data.min_pixels..data.video_max_pixels``; every frame is checked like an image (a missing or unreadable
frame is that image error, naming the video and frame). Text tokens come from
the configured tokenizer (``validate.tokenizer``, else ``base.model`` when it is a local folder). The
offline default has no tokenizer yet (it is trained later, in ``base``), so we count one token per UTF-8
byte of the system and user text plus the chat-template scaffold (see :data:`TEMPLATE_OVERHEAD`): a
byte-level BPE never produces more tokens than bytes, so the estimate can only over-count. Over-long rows
are dropped, never truncated (truncation would cut image tokens and break the image-feature/token match).

The Great Expectations suite runs over the table of rows that survive the row checks (the data the model
would see): ids non-null and unique, split and task in their sets, a solution for verifiable tasks and a
reference for captions, at least one image, prompt within the limit, at least one row.
``ok`` = error fraction <= ``validate.max_error_fraction`` and the suite succeeds.

Speed: on a cached manifest every distinct image is stat'ed and read once per run (a memo keyed by path),
checked by header and end-of-stream marker rather than decoded, and Great Expectations is imported only
when the suite runs (its import alone costs seconds).
"""
from __future__ import annotations

import gc
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from vlgrpo import offline
from vlgrpo.config import Config
from vlgrpo.data.images import ImageError, ImageInfo, inspect_image, vision_block, visual_tokens
from vlgrpo.data.manifest import IMAGE_TAG, SPLITS, VIDEO_TAG, Item
from vlgrpo.data.layouts import WARNING_CHECKS as LAYOUT_WARNINGS
from vlgrpo.data.sources import (TASK_NAMES, ImageRef, Record, assign_split, detect_kind, is_json_array,
                                 iter_records, read_options)
from vlgrpo.io import atomic_dir, atomic_write_json

ERROR_CHECKS = ("invalid_json", "invalid_dataset", "unreadable_source", "unknown_layout", "bad_schema",
                "missing_image", "empty_image", "truncated_image", "not_an_image", "decompression_bomb",
                "bad_aspect_ratio", "empty_solution", "no_image", "no_user_prompt", "image_tag_mismatch",
                "video_tag_mismatch", "missing_video", "corrupt_video", "video_frame_mismatch",
                "unsupported_grounding", "path_escape", "remote_url", "prompt_too_long", "duplicate_id",
                "image_in_two_splits")
WARNING_CHECKS = ("converted_mode", "resized", "upscaled", "duplicate_row", "sampled_frames") + LAYOUT_WARNINGS

# Qwen chat template around one user turn:
#   <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{<|vision_start|><|image_pad|>..<|vision_end|>}
#   {text}<|im_end|>\n<|im_start|>assistant\n
# 5 special tokens + 24 bytes of literal text ("system\n", "\n", "user\n", "\n", "assistant\n"); each image
# adds <|vision_start|> and <|vision_end|> around its pads. Qwen2.5-VL inserts this system prompt if none.
TEMPLATE_OVERHEAD = 5 + len(b"system\n\nuser\n\nassistant\n")
VISION_WRAP = 2
# Each earlier turn of a multi-turn prompt: <|im_start|>{role}\n ... <|im_end|>\n (role bytes added per turn).
TURN_OVERHEAD = 2 + len(b"\n\n")
DEFAULT_SYSTEM = "You are a helpful assistant."


def finding(source: object, line: int, severity: str, check: str, message: str,
            unit: str = "line") -> dict[str, Any]:
    """One finding; ``unit`` "row" (JSON arrays, numbered by element) writes ``<source> row N:``."""
    where = f"{source}:{line}" if unit == "line" else f"{source} row {line}"
    return {"line": line, "severity": severity, "check": check, "message": f"{where}: {message}"}


# --------------------------------------------------------------------------------------------- tokens


class PromptCounter:
    """Text tokens of a prompt: the configured tokenizer when there is one, else the byte estimate."""

    def __init__(self, cfg: Config) -> None:
        self.tokenizer = None
        self.source = "utf8-byte-estimate"
        name = cfg.validate.tokenizer
        if name is None and cfg.base.model and Path(cfg.base.model).is_dir():
            name = cfg.base.model
        if name is not None:
            from transformers import AutoTokenizer  # heavy; only when a tokenizer is configured
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(name)
            except Exception as e:  # noqa: BLE001 - any loading failure means the key is wrong
                key = "validate.tokenizer" if cfg.validate.tokenizer else "base.model"
                raise ValueError(f"params.yaml: {key}: cannot load a tokenizer from {name!r}: {e}") from e
            self.source = str(name)

    def text_tokens(self, item: Item) -> int:
        system = item.system if item.system is not None else DEFAULT_SYSTEM
        turns = item.prompt_turns
        text = "\n".join(t["content"].replace(IMAGE_TAG, "").replace(VIDEO_TAG, "") for t in turns)
        n_img = sum(t["content"].count(IMAGE_TAG) + t["content"].count(VIDEO_TAG) for t in turns)
        # Turns beyond the one the base overhead covers: their role name and scaffold.
        extra = sum(TURN_OVERHEAD + len(t["role"].encode("utf-8")) for t in turns[1:])
        if self.tokenizer is None:
            content = len(system.encode("utf-8")) + len(text.encode("utf-8"))
        else:
            enc = self.tokenizer(system + "\n" + text, add_special_tokens=False)["input_ids"]
            content = len(enc)
        return content + TEMPLATE_OVERHEAD + extra + VISION_WRAP * n_img


# ----------------------------------------------------------------------------------------- image loading


class ImageInspector:
    """Per-run memo of :func:`inspect_image`: each distinct file is stat'ed and read once per run.

    The memo is keyed by path and remembers the (size, mtime) it saw; within one run a file is not expected
    to change, so later rows naming the same path reuse the result without another system call.
    """

    def __init__(self, min_pixels: int, max_pixels: int, deep: bool = False, factor: int = 28) -> None:
        self.min_pixels, self.max_pixels, self.deep, self.factor = min_pixels, max_pixels, deep, factor
        self._memo: dict[str, tuple[tuple[int, int], ImageInfo | ImageError]] = {}

    def __call__(self, ref: ImageRef) -> ImageInfo | None:
        if ref.data is not None:
            return self._in_memory(ref)
        if ref.path is None:
            return None  # a remote image (allowed): validation does not fetch it
        path = str(ref.path)
        hit = self._memo.get(path)
        if hit is None:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise ImageError("missing_image", f"image file not found: {path}") from None
            except OSError as e:
                raise ImageError("missing_image", f"image file cannot be read: {path}: {e}") from None
            try:
                result: ImageInfo | ImageError = inspect_image(path, self.min_pixels, self.max_pixels,
                                                               deep=self.deep, factor=self.factor)
            except ImageError as e:
                result = e
            hit = self._memo[path] = ((st.st_size, st.st_mtime_ns), result)
        if isinstance(hit[1], ImageError):
            raise hit[1]
        return hit[1]

    def _in_memory(self, ref: ImageRef) -> ImageInfo:
        """Image bytes held in the dataset (a Hugging Face image column): always decoded fully."""
        key = "bytes:" + hashlib.blake2b(ref.data, digest_size=16).hexdigest()
        hit = self._memo.get(key)
        if hit is None:
            try:
                result: ImageInfo | ImageError = inspect_image(ref.raw, self.min_pixels, self.max_pixels,
                                                               deep=True, data=ref.data, factor=self.factor)
            except ImageError as e:
                result = e
            hit = self._memo[key] = ((len(ref.data), 0), result)
        if isinstance(hit[1], ImageError):
            raise hit[1]
        return hit[1]


# ------------------------------------------------------------------------------------------- row checks


@dataclass
class Checked:
    """The outcome for one record: kept or not, its findings, and what the table and build need."""
    line: int
    item: Item | None
    keep: bool
    findings: list[dict[str, Any]]
    images: list[ImageInfo] = field(default_factory=list)
    prompt_tokens: int = 0
    duplicate: bool = False
    refs: list[ImageRef] = field(default_factory=list)
    videos: list[list[ImageRef]] = field(default_factory=list)


class RowChecker:
    """Applies every row check in file order; holds the cross-row state (ids, row copies, image splits).

    ``load`` turns an :class:`ImageRef` into an :class:`ImageInfo` (None: a remote image left unchecked) or
    raises :class:`ImageError`; validation passes an :class:`ImageInspector`, the data stage a function that
    also normalises and caches the image. ``factor``: the model's visual-token block (``vision_block``).
    ``load_frame`` does for video frames what ``load`` does for images, in the video budget
    (``data.video_max_pixels``).
    """

    def __init__(self, cfg: Config, source: object, load: Callable[[ImageRef], ImageInfo | None],
                 counter: PromptCounter | None = None, factor: int = 28,
                 load_frame: Callable[[ImageRef], ImageInfo | None] | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self.load = load
        self.load_frame = load_frame or load
        self.counter = counter or PromptCounter(cfg)
        self.max_tokens = cfg.train.max_prompt_tokens
        d = cfg.data
        # A remote image (allowed but not fetched here) is charged the most tokens the budget allows.
        self.remote_tokens = visual_tokens(*_largest_side_pair(d.max_pixels), d.min_pixels, d.max_pixels,
                                           factor)
        # A JSON array's records are numbered by element (json.dump writes them all on line 1).
        self.unit = "row" if isinstance(source, Path) and source.is_file() and is_json_array(source) else "line"
        self._rows: set[bytes] = set()
        self._ids: dict[str, int] = {}
        self._image_split: dict[str, tuple[str, int]] = {}

    def _f(self, line: int, severity: str, check: str, message: str) -> dict[str, Any]:
        return finding(self.source, line, severity, check, message, self.unit)

    def check(self, rec: Record) -> Checked:
        n = rec.line
        if rec.key is not None:
            digest = hashlib.blake2b(rec.key.encode("utf-8", "surrogateescape"), digest_size=16).digest()
            if digest in self._rows:
                return Checked(n, rec.item, False, [self._f(n, "warning", "duplicate_row",
                               "exact duplicate of an earlier row; the copy is dropped")], duplicate=True)
            self._rows.add(digest)
        out = [self._f(n, "error", e.check, e.message) for e in rec.errors]
        out += [self._f(n, "warning", w.check, w.message) for w in rec.warnings]
        item = rec.item
        if item is None:
            return Checked(n, None, False, out)

        if not item.text:
            out.append(self._f(n, "error", "no_user_prompt", "no user prompt text"))
        if not rec.refs and not rec.videos and not item.videos \
                and not any(e.check in ("path_escape", "remote_url") for e in rec.errors):
            out.append(self._f(n, "error", "no_image", "the item has no image"))
        if item.task == "caption":
            if not any(r.strip() for r in item.references):
                out.append(self._f(n, "error", "empty_solution", "caption item without a reference caption"))
        elif not item.solution.strip():
            out.append(self._f(n, "error", "empty_solution", f"empty solution for a {item.task!r} item"))

        infos: list[ImageInfo] = []
        tokens_img = 0
        for ref in rec.refs:
            try:
                info = self.load(ref)
            except ImageError as e:
                out.append(self._f(n, "error", e.check, e.message))
                continue
            if info is None:  # remote, allowed, not fetched: charge the largest image the budget allows
                tokens_img += self.remote_tokens
                continue
            infos.append(info)
            tokens_img += info.visual_tokens
            for w in info.warnings:
                out.append(self._f(n, "warning", w.check, w.message))
        for v, frames in enumerate(rec.videos, 1):
            tokens_v, first = _video_frames(self, n, v, frames, out)
            tokens_img += tokens_v
            infos += first

        tokens = self.counter.text_tokens(item) + tokens_img
        if tokens > self.max_tokens:
            out.append(self._f(n, "error", "prompt_too_long",
                               f"prompt is {tokens} tokens ({tokens_img} visual + {tokens - tokens_img} text, "
                               f"{self.counter.source}) > train.max_prompt_tokens={self.max_tokens}; "
                               "the row is dropped, not truncated"))
        if any(f["severity"] == "error" for f in out):
            return Checked(n, item, False, out, infos, tokens, refs=rec.refs, videos=rec.videos)

        if item.split is None:
            # Imported rows without a split: keyed by the image content, so every row about one image
            # lands in the same split (no leakage); the id only when there is no local image.
            key = infos[0].sha256 if infos else item.id
            item.split = assign_split(key, self.cfg.data.val_fraction, self.cfg.data.test_fraction)
        first = self._ids.get(item.id)
        if first is not None:
            out.append(self._f(n, "error", "duplicate_id", f"id {item.id!r} already used on {self.unit} {first}"))
        for info in infos:
            seen = self._image_split.get(info.sha256)
            if seen is not None and seen[0] != item.split:
                out.append(self._f(n, "error", "image_in_two_splits",
                                   f"image {info.sha256[:12]} is in split {item.split!r} here and in "
                                   f"{seen[0]!r} on {self.unit} {seen[1]}"))
        if any(f["severity"] == "error" for f in out):
            return Checked(n, item, False, out, infos, tokens, refs=rec.refs, videos=rec.videos)
        self._ids[item.id] = n
        for info in infos:
            self._image_split.setdefault(info.sha256, (item.split, n))
        return Checked(n, item, True, out, infos, tokens, refs=rec.refs, videos=rec.videos)


def _video_frames(checker: RowChecker, n: int, v: int, frames: list[ImageRef], out: list[dict[str, Any]]
                  ) -> tuple[int, list[ImageInfo]]:
    """Check video ``v``'s frames like images → (its visual tokens, [its first frame's info] for the split
    key); a frame error or frames of different sizes are findings in ``out``."""
    infos = []
    for k, ref in enumerate(frames, 1):
        try:
            info = checker.load_frame(ref)
        except ImageError as e:
            out.append(checker._f(n, "error", e.check, f"video {v} frame {k}: {e.message}"))
            continue
        if info is not None:
            infos.append(info)
            out += [checker._f(n, "warning", w.check, f"video {v} frame {k}: {w.message}") for w in info.warnings]
    sizes = {i.target for i in infos}
    if len(sizes) > 1:
        out.append(checker._f(n, "error", "video_frame_mismatch", f"video {v}: frames of different sizes "
                              f"after resizing ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))})"))
    per_frame = max((i.visual_tokens for i in infos), default=checker.remote_tokens)
    return -(-len(frames) // 2) * per_frame, infos[:1]


def _largest_side_pair(max_pixels: int) -> tuple[int, int]:
    side = int(max_pixels ** 0.5)
    return side, side


# ----------------------------------------------------------------------------------- Great Expectations


def _expectations(max_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    verifiable = 'task!="caption"'
    return [
        ("ExpectTableRowCountToBeBetween", {"min_value": 1}),
        ("ExpectColumnValuesToNotBeNull", {"column": "id"}),
        ("ExpectColumnValuesToBeUnique", {"column": "id"}),
        ("ExpectColumnValuesToBeInSet", {"column": "split", "value_set": list(SPLITS)}),
        ("ExpectColumnValuesToBeInSet", {"column": "task", "value_set": list(TASK_NAMES)}),
        ("ExpectColumnValueLengthsToBeBetween", {"column": "solution", "min_value": 1,
                                                 "row_condition": verifiable, "condition_parser": "pandas"}),
        ("ExpectColumnValuesToBeBetween", {"column": "n_references", "min_value": 1,
                                           "row_condition": 'task=="caption"', "condition_parser": "pandas"}),
        ("ExpectColumnValuesToBeBetween", {"column": "n_images", "min_value": 1}),
        ("ExpectColumnValuesToBeBetween", {"column": "prompt_chars", "min_value": 1}),
        ("ExpectColumnValuesToBeBetween", {"column": "prompt_tokens", "min_value": 1,
                                           "max_value": max_tokens}),
    ]


def run_suite(table: dict[str, list[Any]], max_tokens: int, data_docs_dir: Path | None = None,
              run_name: str | None = None) -> tuple[bool, list[dict[str, Any]]]:
    """Run the suite over the per-row table; write Data Docs (HTML) to ``data_docs_dir`` atomically.

    ``run_name`` names the validation run in the Data Docs (GE's default is ``__none__``); the pages load
    nothing from the network (vlgrpo.data.docs_offline).
    """
    offline.apply()                                 # no analytics call home, also when used as a library
    import great_expectations as gx  # lazy: ~3 s import
    import pandas as pd
    from great_expectations.data_context.types.base import ProgressBarsConfig

    df = pd.DataFrame(table)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    asset = ctx.data_sources.add_pandas("vlgrpo").add_dataframe_asset("manifest")
    batch = asset.add_batch_definition_whole_dataframe("rows")
    suite = ctx.suites.add(gx.ExpectationSuite(name="vlgrpo_manifest"))
    for name, kwargs in _expectations(max_tokens):
        suite.add_expectation(getattr(gx.expectations, name)(**kwargs))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name="manifest_rows", data=batch, suite=suite))

    def run(docs_base: Path | None):
        actions = []
        if docs_base is not None:
            ctx.add_data_docs_site(site_name="vlgrpo", site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(Path(docs_base).resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
            actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["vlgrpo"])]
        cp = ctx.checkpoints.add(gx.Checkpoint(name="validate", validation_definitions=[vd], actions=actions,
                                               result_format={"result_format": "SUMMARY"}))
        from great_expectations.core.run_identifier import RunIdentifier

        return cp.run(batch_parameters={"dataframe": df}, run_id=RunIdentifier(run_name=run_name))

    if data_docs_dir is None:
        res = run(None)
    else:
        from vlgrpo.data.docs_offline import make_offline

        with atomic_dir(data_docs_dir) as tmp:  # old docs stay whole until the new site is complete
            res = run(tmp)
            make_offline(tmp)
    out = []
    for vr in res.run_results.values():
        for r in vr.results:
            cfg = r.expectation_config
            kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",)}
            out.append({"expectation": cfg.type, "kwargs": _plain(kwargs), "success": bool(r.success),
                        "unexpected_count": (r.result or {}).get("unexpected_count"),
                        "observed_value": _plain((r.result or {}).get("observed_value"))})
    return bool(res.success), out


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    return v


# -------------------------------------------------------------------------------------------- the stage


@dataclass
class ValidationResult:
    ok: bool
    input: str
    kind: str
    rows: int
    valid_rows: int
    error_rows: int
    error_fraction: float
    counts: dict[str, int]
    findings: list[dict[str, Any]]
    expectations: list[dict[str, Any]]
    suite_success: bool
    tokenizer: str = ""

    def to_report(self) -> dict[str, Any]:
        return {"ok": self.ok, "input": self.input, "kind": self.kind, "rows": self.rows,
                "valid_rows": self.valid_rows, "error_rows": self.error_rows,
                "error_fraction": self.error_fraction, "counts": self.counts,
                "suite_success": self.suite_success, "tokenizer": self.tokenizer,
                "findings": self.findings, "expectations": self.expectations}


def check_records(records: Iterable[Record], checker: RowChecker
                  ) -> tuple[list[Checked], list[dict[str, Any]], dict[str, int]]:
    """Run the checker over records; (kept rows, all findings, {rows, error_rows, duplicates})."""
    kept, findings = [], []
    stats = {"rows": 0, "error_rows": 0, "duplicates": 0}
    # Every row adds long-lived objects; the cyclic GC would rescan all of them again and again (quadratic
    # on 100k rows, a third of the run). Nothing here makes reference cycles, so pause it.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rec in records:
            c = checker.check(rec)
            stats["rows"] += 1
            if c.findings:
                findings.extend(c.findings)
            if c.keep:
                kept.append(c)
            elif c.duplicate:
                stats["duplicates"] += 1
            else:
                stats["error_rows"] += 1
    finally:
        if was_enabled:
            gc.enable()
    return kept, findings, stats


def rows_table(kept: list[Checked]) -> dict[str, list[Any]]:
    """The per-row table the suite runs on (one entry per kept row)."""
    return {
        "id": [c.item.id for c in kept],
        "split": [c.item.split for c in kept],
        "task": [c.item.task for c in kept],
        "solution": [c.item.solution for c in kept],
        "n_references": [len(c.item.references) for c in kept],
        "n_images": [len(c.item.images) + len(c.item.videos) for c in kept],  # visual inputs: images + videos
        "prompt_chars": [len(c.item.text) for c in kept],
        "prompt_tokens": [c.prompt_tokens for c in kept],
    }


def check_file(path: str | Path, cfg: Config, kind: str | None = None, root: Path | None = None
               ) -> tuple[str, list[Checked], list[dict[str, Any]], dict[str, int], str]:
    """Row checks only (no Great Expectations): (kind, kept rows, findings, stats, tokenizer source).

    ``root``: the folder ``data.image_base`` / ``data.image_roots`` are relative to (default: cwd).
    A source that cannot be opened at all comes back as one ``unreadable_source`` finding (kind ``unknown``).
    """
    path = Path(path)
    d = cfg.data
    try:
        kind = kind or detect_kind(path)
    except (ValueError, OSError) as e:
        return "unknown", [], [finding(path, 0, "error", "unreadable_source", str(e).removeprefix(f"{path}: "))], \
            {"rows": 1, "error_rows": 1, "duplicates": 0}, "none"
    # Our cached manifest gets the fast header check; raw sources are decoded fully, as the import will.
    factor = vision_block(cfg.base.model)
    inspector = ImageInspector(d.min_pixels, d.max_pixels, deep=kind != "manifest", factor=factor)
    frames = ImageInspector(d.min_pixels, d.video_max_pixels, deep=kind != "manifest", factor=factor)
    checker = RowChecker(cfg, path, inspector, factor=factor, load_frame=frames)
    opts = read_options(d, root, coco_split=d.split if kind == "coco" and path.is_dir() else None)
    records = iter_records(path, kind, opts)
    kept, findings, stats = check_records(records, checker)
    return kind, kept, findings, stats, checker.counter.source


def validate_file(path: str | Path, cfg: Config, report_path: Path | None = None,
                  data_docs_dir: Path | None = None, root: Path | None = None) -> ValidationResult:
    """Validate a manifest or raw source file; write the JSON report (atomically) if ``report_path``.

    ``data_docs_dir``: where the Great Expectations Data Docs site (HTML) goes; None writes none.
    ``root``: the folder relative ``data.image_base`` / ``data.image_roots`` start from (default: cwd).
    """
    path = Path(path)
    kind, kept, findings, stats, tokenizer = check_file(path, cfg, root=root)
    counts: dict[str, int] = {}
    for f in findings:
        counts[f["check"]] = counts.get(f["check"], 0) + 1
    rows = stats["rows"]
    error_fraction = stats["error_rows"] / rows if rows else 1.0
    valid_rows = len(kept)
    table = rows_table(kept)
    del kept  # 100k items with nested dicts would make every garbage collection inside GX slow
    suite_ok, expectations = run_suite(table, cfg.train.max_prompt_tokens, data_docs_dir,
                                       run_name=f"{path.stem}-{rows}-rows")
    ok = error_fraction <= cfg.validate.max_error_fraction and suite_ok
    result = ValidationResult(ok=ok, input=str(path), kind=kind, rows=rows, valid_rows=valid_rows,
                              error_rows=stats["error_rows"], error_fraction=error_fraction,
                              counts=dict(sorted(counts.items())), findings=findings,
                              expectations=expectations, suite_success=suite_ok, tokenizer=tokenizer)
    if report_path is not None:
        atomic_write_json(report_path, result.to_report())
    return result


def format_summary(result: ValidationResult, max_findings: int = 10) -> str:
    """A few lines for stderr: verdict, counts, the first findings."""
    verdict = "OK" if result.ok else "FAILED"
    lines = [f"validate {verdict}: {result.input} ({result.kind}): {result.rows} rows, "
             f"{result.valid_rows} valid, {result.error_rows} with errors "
             f"(error fraction {result.error_fraction:.4f}); expectations "
             f"{sum(e['success'] for e in result.expectations)}/{len(result.expectations)} passed"]
    if result.counts:
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in result.counts.items()))
    for f in result.findings[:max_findings]:
        lines.append(f"  {f['severity']}: {f['check']}: {f['message']}")
    if len(result.findings) > max_findings:
        lines.append(f"  ... {len(result.findings) - max_findings} more in the report")
    for e in result.expectations:
        if not e["success"]:
            lines.append(f"  expectation failed: {e['expectation']} {e['kwargs'].get('column', '')}".rstrip())
    return "\n".join(lines)


__all__ = ["ERROR_CHECKS", "WARNING_CHECKS", "TEMPLATE_OVERHEAD", "PromptCounter", "ImageInspector",
           "RowChecker", "Checked", "ValidationResult", "check_records", "rows_table", "run_suite",
           "check_file", "validate_file", "format_summary", "finding"]
