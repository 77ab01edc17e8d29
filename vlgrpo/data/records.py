"""Rows as :class:`Record` s: the types every reader yields and the row-to-record step they share.

A reader (:mod:`vlgrpo.data.sources` for JSON lines, COCO, Flickr30k and the manifest,
:mod:`vlgrpo.data.hf` for Hugging Face datasets) produces (line, duplicate key, parsed row) triples;
:func:`row_records` turns them into Records through the layouts (:mod:`vlgrpo.data.layouts`), resolving and
confining image and video paths with a :class:`PathResolver` (rules in the :mod:`vlgrpo.data.sources`
docstring). This module imports neither reader, so both can import it.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vlgrpo.data.images import Issue, png_bytes
from vlgrpo.data.layouts import SOLUTION_KEYS, detect_layout, parse_row, unknown_layout_message
from vlgrpo.data.manifest import SPLITS, Item

# Task names a manifest may carry: the synthetic ones plus 'vqa' for imported question/answer rows.
TASK_NAMES = ("count", "color", "shape", "exists", "caption", "vqa", "ground", "motion")
# Split names as sources write them -> ours
SPLIT_ALIASES = {"train": "train", "training": "train", "restval": "train", "val": "val",
                 "valid": "val", "validation": "val", "dev": "val", "test": "test", "testing": "test"}

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


@dataclass
class ImageRef:
    """One image reference as written in the source, and where it points.

    Exactly one of ``path`` (a resolved local file), ``url`` (a remote image) or ``data`` (encoded bytes
    held in the dataset itself, e.g. a Hugging Face image column) is set; ``raw`` names it in messages.
    """
    raw: str
    path: Path | None = None
    url: str | None = None
    data: bytes | None = None


@dataclass
class Record:
    """One row of a source: an item candidate, or only the reasons it could not become one.

    ``item.split`` is None when the source has no split (assigned later from the image content).
    ``key`` is the row's exact content, for duplicate-row detection. ``warnings`` name what the row carries
    but vlgrpo does not use (audio, preference data, tool schemas) or repairs (frames sampled).
    ``videos`` holds each video's frames, in order.
    """
    line: int
    item: Item | None
    refs: list[ImageRef] = field(default_factory=list)
    errors: list[Issue] = field(default_factory=list)
    key: str | None = None
    warnings: list[Issue] = field(default_factory=list)
    videos: list[list[ImageRef]] = field(default_factory=list)


class PathResolver:
    """Resolve image references (see the module docstring for the order) and confine them; memoised."""

    def __init__(self, base: Path, root: Path, allow_remote: bool, image_base: Path | None = None,
                 image_roots: tuple[Path, ...] = ()) -> None:
        self.base = Path(base)
        self.bases = ([Path(image_base)] if image_base else []) + [self.base] + [Path(r) for r in image_roots]
        self.root = Path(root).resolve()
        self.roots = [self.root] + [Path(r).resolve() for r in ([image_base] if image_base else [])
                                    + list(image_roots)]
        self.allow_remote = allow_remote
        self._memo: dict[str, ImageRef | Issue] = {}

    def __call__(self, raw: str) -> ImageRef | Issue:
        hit = self._memo.get(raw)
        if hit is None:
            hit = self._memo[raw] = self._resolve(raw)
        return hit

    def _candidate(self, raw_path: str) -> Path:
        p = Path(raw_path)
        if p.is_absolute():
            return p
        for base in self.bases:
            try:
                if (base / p).exists():
                    return base / p
            except OSError:
                continue
        return self.bases[0] / p

    def _resolve(self, raw: str) -> ImageRef | Issue:
        if raw.startswith("file://"):
            raw_path = raw[len("file://"):]
        elif _URL.match(raw):
            if self.allow_remote:
                return ImageRef(raw=raw, url=raw)
            return Issue("remote_url", f"image {raw!r} is a remote URL and data.allow_remote is false")
        else:
            raw_path = raw
        if "\x00" in raw_path:  # no file system accepts it; os calls would raise ValueError
            return Issue("bad_schema", f"image path {raw[:200]!r} contains a NUL byte")
        p = self._candidate(raw_path)
        try:
            resolved = p.resolve()  # follows symlinks, so a link pointing out is caught too
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
            return Issue("missing_image", f"image {raw[:200]!r} cannot be resolved: "
                                          f"{getattr(e, 'strerror', None) or e}")
        if not any(resolved.is_relative_to(r) for r in self.roots):
            allowed = ", ".join(str(r) for r in self.roots[1:])
            return Issue("path_escape",
                         f"image {raw!r} resolves to {resolved}, outside the dataset folder {self.root}"
                         + (f" and data.image_base/image_roots ({allowed})" if allowed else "")
                         + "; add its folder to data.image_roots to allow it")
        return ImageRef(raw=raw, path=resolved)


def resolve_all(raws: list[str], resolve: PathResolver) -> tuple[list[ImageRef], list[Issue]]:
    """Resolve every raw image path → (the refs that resolved, the issues of those that did not)."""
    refs, errors = [], []
    for raw in raws:
        r = resolve(raw)
        (errors if isinstance(r, Issue) else refs).append(r)
    return refs, errors


@dataclass(frozen=True)
class ReadOptions:
    """How rows are read: ``data.format``, ``data.columns``, ``data.allow_remote`` and the image folders.

    ``image_base`` / ``image_roots`` are absolute (resolved against the project root by
    :func:`vlgrpo.data.sources.read_options`).
    """
    format: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()
    allow_remote: bool = False
    image_base: Path | None = None
    image_roots: tuple[Path, ...] = ()
    coco_split: str | None = None
    video_max_frames: int = 8

    def resolver(self, base: Path, root: Path) -> "PathResolver":
        return PathResolver(base, root, self.allow_remote, image_base=self.image_base,
                            image_roots=self.image_roots)


def _rename(row: dict[str, Any], columns: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """ms-swift's ``--columns``: ``{old: new}`` renames before the layout is detected."""
    if not columns:
        return row
    row = dict(row)
    for old, new in columns:
        if old in row:
            row[new] = row.pop(old)
    return row


def _image_ref(entry: Any, label: str, resolve: PathResolver) -> ImageRef | Issue:
    """A raw image entry (path, ``{"path"}``, ``{"bytes"}``, bytes, PIL image) as an ImageRef."""
    if isinstance(entry, dict):
        data = entry.get("bytes")
        if isinstance(data, (bytes, bytearray)):
            return ImageRef(raw=label, data=bytes(data))
        entry = entry.get("path")
    if isinstance(entry, (bytes, bytearray)):
        return ImageRef(raw=label, data=bytes(entry))
    if isinstance(entry, str):
        return resolve(entry)
    buf = io.BytesIO()  # a decoded PIL image: re-encode losslessly so it is checked and cached like a file
    entry.save(buf, format="PNG")
    return ImageRef(raw=label, data=buf.getvalue())


FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _video_file(path: Path, entry: str, label: str, max_frames: int) -> tuple[list[ImageRef], list[Issue], list[Issue]]:
    """A video file decoded (PyAV, ``vlgrpo.data.video_files``) into frame refs holding PNG bytes, named
    ``<entry>#frame<k>`` (k: the frame's index in the file) → (frame refs, errors, warnings)."""
    from vlgrpo.data.video_files import VideoDecodeError, decode_video, even_indices

    try:
        frames, total = decode_video(path, max_frames)
    except VideoDecodeError as e:
        return [], [Issue("corrupt_video", f"{label}: video file {entry!r} {e}")], []
    warnings = []
    if total > max_frames:
        warnings.append(Issue("sampled_frames", f"{label}: {total} frames of {entry!r} sampled evenly down "
                                                f"to data.video_max_frames={max_frames}"))
    idx = even_indices(total, max_frames)
    return [ImageRef(raw=f"{entry}#frame{k}", data=png_bytes(f)) for k, f in zip(idx, frames)], [], warnings


def video_frames(entry: str | list[str], label: str, resolve: PathResolver, max_frames: int
                 ) -> tuple[list[ImageRef], list[Issue], list[Issue]]:
    """One video entry (a frame folder, a list of frame paths or a video file) → (frame refs, errors,
    warnings)."""
    from vlgrpo.data.video_files import even_indices

    if isinstance(entry, str):
        folder = resolve(entry)
        if isinstance(folder, Issue):
            return [], [folder], []
        if folder.path is not None and folder.path.is_file():
            return _video_file(folder.path, entry, label, max_frames)
        if folder.path is None or not folder.path.is_dir():
            return [], [Issue("missing_video", f"{label}: frame folder or video file not found: {entry!r}")], []
        names = sorted((p.name for p in folder.path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural)
        if not names:
            return [], [Issue("missing_video", f"{label}: frame folder {entry!r} holds no frame images")], []
        entry = [str(folder.path / n) for n in names]
    warnings = []
    if len(entry) > max_frames:  # evenly spaced, first and last kept
        warnings.append(Issue("sampled_frames", f"{label}: {len(entry)} frames sampled evenly down to "
                                                f"data.video_max_frames={max_frames}"))
        entry = [entry[i] for i in even_indices(len(entry), max_frames)]
    refs, errors = resolve_all(entry, resolve)
    return refs, errors, warnings


def _split(value: Any, errors: list[Issue]) -> str | None:
    if value is None:
        return None
    mapped = SPLIT_ALIASES.get(str(value).lower())
    if mapped is None:
        errors.append(Issue("bad_schema", f"split {value!r} is not one of {', '.join(SPLITS)}"))
    return mapped


def row_item(obj: dict[str, Any], layout: str, line: int, stem: str, resolve: PathResolver,
             max_frames: int = 8) -> tuple[Item, list[ImageRef], list[Issue], list[Issue], list[list[ImageRef]]]:
    """One row in ``layout`` as (Item with split None unless the row has one, image refs, errors, warnings,
    each video's frame refs)."""
    p = parse_row(obj, layout)
    errors = list(p.errors)
    videos: list[list[ImageRef]] = []
    for i, entry in enumerate(p.videos, 1):
        frames, errs, warns = video_frames(entry, f"video {i}", resolve, max_frames)
        videos.append(frames)
        errors += errs
        p.warnings += warns
    refs: list[ImageRef] = []
    labels: list[str] = []
    for i, entry in enumerate(p.images, 1):
        r = _image_ref(entry, f"{stem}:{line}:image{i}", resolve)
        if isinstance(r, Issue):
            errors.append(r)
            labels.append(entry if isinstance(entry, str) else str(entry.get("path")))
        else:
            refs.append(r)
            labels.append(r.raw)
    users = [t for t in p.turns if t["role"] == "user"]
    question = users[-1]["content"] if users else ""
    multi = len(p.turns) > 1 or (p.turns and p.turns[0]["role"] != "user")
    solution = obj.get("solution", p.answer)
    if solution is None and any(k in obj for k in SOLUTION_KEYS):
        solution = next(obj[k] for k in SOLUTION_KEYS if k in obj)
    solution = "" if solution is None else (solution if isinstance(solution, str)
                                            else json.dumps(solution, ensure_ascii=False))
    task = obj.get("task") if obj.get("task") in TASK_NAMES else "vqa"
    ref_col = obj.get("references")
    references = [str(r) for r in ref_col] if isinstance(ref_col, list) else []
    if task == "caption" and not references and solution.strip():
        references = [solution]
    ident = obj.get("id")
    item = Item(id=str(ident) if ident is not None else f"{stem}-{line}", split=_split(obj.get("split"), errors),
                task=task, question=question, images=labels, solution=solution, references=references,
                scene=None, system=p.system if isinstance(p.system, str) else None, extra=p.extra,
                turns=p.turns if multi else [], videos=[[f.raw for f in v] for v in videos])
    return item, refs, errors, p.warnings, videos


def row_records(rows: Iterator[tuple[int, str, Any]], opts: ReadOptions, resolve: PathResolver,
                stem: str) -> Iterator[Record]:
    """Records from (line, duplicate key, parsed row or Issue): the layout comes from ``data.format`` or,
    for ``auto``, from the first row; when no layout fits, one ``unknown_layout`` error and nothing else."""
    layout = None if opts.format == "auto" else opts.format
    for n, key, obj in rows:
        if isinstance(obj, Issue):
            yield Record(n, None, errors=[obj])
            continue
        obj = _rename(obj, opts.columns)
        if layout is None:
            layout = detect_layout(obj)
            if layout is None:
                yield Record(n, None, errors=[Issue("unknown_layout", unknown_layout_message(list(obj), f"row {n}"))])
                return
        item, refs, errors, warnings, videos = row_item(obj, layout, n, stem, resolve, opts.video_max_frames)
        yield Record(n, item, refs, errors, key=key, warnings=warnings, videos=videos)
