"""Readers for the data the pipeline accepts, each yielding :class:`Record` s with 1-based line numbers.

Kinds (``detect_kind`` tells them apart, so ``vlgrpo validate --data`` accepts any of them):

- ``manifest``  - our own ``manifest.jsonl`` (schema in :mod:`vlgrpo.data.manifest`).
- ``jsonl``     - rows in any ms-swift layout (:mod:`vlgrpo.data.layouts`: messages, LLaVA, ShareGPT, Alpaca,
  query/response, problem/solution), one JSON object a line, or a ``.json`` file holding an array of them.
  Extra columns are kept in ``Item.extra`` and passed to rewards.
- ``hf``        - a Hugging Face dataset: a ``datasets.save_to_disk`` folder or parquet file(s)
  (:mod:`vlgrpo.data.hf`); its rows go through the same layouts.
- ``coco``      - COCO captions: ``<root>/annotations/captions_<split>.json`` + an image folder.
- ``flickr30k`` - the Karpathy split file ``<root>/dataset_flickr30k.json`` + an image folder.

Line numbers: for JSON lines a record's ``line`` is its line in the file; for a JSON array, the line its
element starts on; for a Hugging Face dataset, the 1-based row number. COCO and Flickr30k are one JSON
document, so there ``line`` is the 1-based position of the entry in the file's ``images`` array (COCO: the
image entry that all its captions attach to); a file that is not valid JSON at all is reported at the line
the JSON parser stopped on.

Image paths. A relative path is looked up, in order, in ``data.image_base`` (when set), the dataset's own
folder (COCO / Flickr30k: its image folder), then each ``data.image_roots`` folder; the first place where the
file exists wins (none: it is reported missing under the first). The resolved file (symlinks followed) must
lie inside the dataset's folder, ``data.image_base`` or one of ``data.image_roots``; anything else - ``..``
or an absolute path elsewhere, or a symlink pointing out - is a ``path_escape`` error. A URL (``http://``,
``s3://``, ...) is a ``remote_url`` error unless ``data.allow_remote`` is true.

Videos (jsonl / hf rows). A video is a folder of frame images (read in natural order of their names:
``f2.png`` before ``f10.png``) or a list of frame paths; each frame is resolved and confined like an image.
More than ``data.video_max_frames`` frames are sampled evenly down to it (a ``sampled_frames`` warning).
A video file (``.mp4``, ``.webm``, ... anything FFmpeg reads) is decoded with PyAV
(:mod:`vlgrpo.data.video_files`) and sampled the same way; its frames are then checked and cached like any
frame. A path that does not exist, or a folder with no frames, is ``missing_video``; a file that does not
decode completely (not a video, cut short) is ``corrupt_video``, naming the file and the reason.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from vlgrpo.data.images import Issue, png_bytes
from vlgrpo.data.layouts import SOLUTION_KEYS, detect_layout, parse_row, unknown_layout_message
from vlgrpo.data.manifest import IMAGE_TAG, SPLITS, Item

KINDS = ("manifest", "jsonl", "hf", "coco", "flickr30k")
# Task names a manifest may carry: the synthetic ones plus 'vqa' for imported question/answer rows.
TASK_NAMES = ("count", "color", "shape", "exists", "caption", "vqa", "ground", "motion")
CAPTION_PROMPT = f"{IMAGE_TAG}Describe this image in one sentence."
SPLIT_ALIASES = {"train": "train", "training": "train", "restval": "train", "val": "val",
                 "valid": "val", "validation": "val", "dev": "val", "test": "test", "testing": "test"}

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# A JSON escape of a UTF-16 surrogate: legal JSON, but a lone one decodes to text no encoder accepts.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _bad_unicode(text: str, obj: Any) -> bool:
    """True when ``text`` (or what it parsed to) holds lone surrogates, e.g. from invalid UTF-8 bytes."""
    try:
        text.encode("utf-8")
        if _SURROGATE_ESCAPE.search(text):  # rare: only then pay for re-serialising the object
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_MANIFEST_KEYS = {"id", "split", "task", "question", "images"}


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


def assign_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a stable key: sha256 → uniform number in [0, 1) → test | val | train."""
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) / float(1 << 64)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


# --------------------------------------------------------------------------------------------- detecting


def detect_kind(path: str | Path) -> str:
    """Which reader a file (or a dataset folder) needs; ValueError naming the file if none."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_flickr30k.json").is_file():
            return "flickr30k"
        if sorted((path / "annotations").glob("captions_*.json")):
            return "coco"
        from vlgrpo.data.hf import is_hf_folder
        if is_hf_folder(path):
            return "hf"
        raise ValueError(f"{path}: a folder, but neither a COCO root (annotations/captions_<split>.json), "
                         f"a Flickr30k root (dataset_flickr30k.json), a datasets.save_to_disk folder "
                         f"(state.json / dataset_dict.json) nor a folder of parquet files")
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    if path.suffix in (".parquet", ".arrow"):
        return "hf"
    if path.suffix == ".json":
        if path.name.startswith("dataset_"):
            return "flickr30k"
        if path.name.startswith("captions_"):
            return "coco"
        if _is_json_array(path):
            return "jsonl"
        doc_kind = _document_kind(path)
        if doc_kind is not None:
            return doc_kind
    # JSON lines: the first line that parses decides; our manifest has all of its required keys.
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f):
            if n >= 100:
                break
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: hostile nesting depth
                continue
            if isinstance(obj, dict):
                return "manifest" if _MANIFEST_KEYS <= obj.keys() else "jsonl"
    return "jsonl"


def _document_kind(path: Path) -> str | None:
    """COCO / Flickr30k for a ``.json`` document with an ``images`` array of their shape, else None."""
    head = _read_head(path)
    first = head.split("\n", 1)[0]
    try:  # a one-line document (or the first line of JSON lines)
        obj = json.loads(first)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict) and not isinstance(obj.get("images"), list):
        return None  # a JSON-lines row in a .json file
    if '"sentences"' in head:
        return "flickr30k"
    if '"annotations"' in head or '"caption"' in head:
        return "coco"
    return None


def _read_head(path: Path, n: int = 1 << 16) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(n)


def iter_records(path: str | Path, kind: str | None = None, opts: ReadOptions | None = None, *,
                 allow_remote: bool | None = None, coco_split: str | None = None) -> Iterator[Record]:
    """Records of any kind; ``path`` is the file (or, for COCO / Flickr30k / hf, the file or its folder)."""
    path = Path(path)
    opts = opts or ReadOptions()
    if allow_remote is not None or coco_split is not None:  # the older keyword form
        opts = ReadOptions(opts.format, opts.columns, opts.allow_remote if allow_remote is None else allow_remote,
                           opts.image_base, opts.image_roots,
                           coco_split if coco_split is not None else opts.coco_split)
    kind = kind or detect_kind(path)
    if kind == "manifest":
        return iter_manifest_records(path, allow_remote=opts.allow_remote)
    if kind in ("jsonl", "json"):
        return iter_row_records(path, opts)
    if kind == "hf":
        from vlgrpo.data.hf import iter_hf_records  # imports pyarrow / datasets: only when needed
        return iter_hf_records(path, opts)
    if kind == "coco":
        return iter_coco_records(path, split=opts.coco_split, opts=opts)
    if kind == "flickr30k":
        return iter_flickr_records(path, opts=opts)
    raise ValueError(f"unknown source kind {kind!r}; allowed: {', '.join(KINDS)}")


# ------------------------------------------------------------------------------------------ JSON lines


def _json_lines(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(line number, stripped text, parsed object or an Issue) for every non-blank line."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                yield n, text, Issue("invalid_json", f"not valid JSON: {e}")
                continue
            except RecursionError:
                yield n, text, Issue("invalid_json", "JSON nested too deeply to parse")
                continue
            if not isinstance(obj, dict):
                yield n, text, Issue("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
                continue
            if _bad_unicode(text, obj):
                yield n, text, Issue("invalid_json", "not valid UTF-8 / Unicode text (a lone surrogate)")
                continue
            yield n, text, obj


def _resolve_all(raws: list[str], resolve: PathResolver) -> tuple[list[ImageRef], list[Issue]]:
    refs, errors = [], []
    for raw in raws:
        r = resolve(raw)
        (errors if isinstance(r, Issue) else refs).append(r)
    return refs, errors


def _jsonl_records(path: str | Path, allow_remote: bool,
                   parse: Callable[[dict, int, str], tuple[Item | None, list[Issue]]]) -> Iterator[Record]:
    """One Record per JSON line: ``parse`` turns the object into an Item (None when the row is unusable);
    image paths are relative to, and confined to, the file's folder."""
    path = Path(path)
    resolve = PathResolver(path.parent, path.parent, allow_remote)
    for n, text, obj in _json_lines(path):
        if isinstance(obj, Issue):
            yield Record(n, None, errors=[obj])
            continue
        item, errors = parse(obj, n, path.stem)
        if item is None:
            yield Record(n, None, errors=errors, key=text)
            continue
        refs, errs = _resolve_all(item.images, resolve)
        videos = [_resolve_all(v, resolve) for v in item.videos]
        errs += [e for _, ve in videos for e in ve]
        yield Record(n, item, refs, errors + errs, key=text, videos=[v for v, _ in videos])


def manifest_item(obj: dict, line: int, stem: str) -> tuple[Item | None, list[Issue]]:
    """A manifest row as an Item, or None with the schema problem."""
    missing = sorted(_MANIFEST_KEYS - obj.keys())
    if missing:
        return None, [Issue("bad_schema", f"missing key(s): {', '.join(missing)}")]
    images = obj.get("images")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        return None, [Issue("bad_schema", "'images' must be a list of paths")]
    try:
        item = Item.from_dict(obj)
    except (TypeError, ValueError) as e:
        return None, [Issue("bad_schema", f"not a manifest row: {e}")]
    errors = []
    if item.split not in SPLITS:
        errors.append(Issue("bad_schema", f"split {item.split!r} is not one of {', '.join(SPLITS)}"))
    if item.task not in TASK_NAMES:
        errors.append(Issue("bad_schema", f"task {item.task!r} is not one of {', '.join(TASK_NAMES)}"))
    return item, errors


def iter_manifest_records(path: str | Path, allow_remote: bool = False) -> Iterator[Record]:
    """Our manifest: images are relative to (and confined to) the manifest's folder."""
    return _jsonl_records(path, allow_remote, manifest_item)


@dataclass(frozen=True)
class ReadOptions:
    """How rows are read: ``data.format``, ``data.columns``, ``data.allow_remote`` and the image folders.

    ``image_base`` / ``image_roots`` are absolute (resolved against the project root by :func:`read_options`).
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


def read_options(data_cfg: Any, root: Path | None = None, coco_split: str | None = None) -> ReadOptions:
    """The :class:`ReadOptions` of a ``DataConfig``; relative folders are taken from ``root`` (default: cwd)."""
    from vlgrpo.io import under_root

    root = Path.cwd() if root is None else Path(root)
    absolute = lambda p: under_root(root, p)  # noqa: E731

    return ReadOptions(format=data_cfg.format, columns=tuple(data_cfg.columns.items()),
                       allow_remote=data_cfg.allow_remote,
                       image_base=absolute(data_cfg.image_base) if data_cfg.image_base else None,
                       image_roots=tuple(absolute(r) for r in data_cfg.image_roots), coco_split=coco_split,
                       video_max_frames=data_cfg.video_max_frames)


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
    refs, errors = _resolve_all(entry, resolve)
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


def _json_array(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(line, element text, element or Issue) for each element of a JSON array file.

    Elements are decoded one at a time, so each is reported at the line it starts on; a syntax error
    stops the file there (there is no way to resynchronise inside a broken JSON document).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        yield 1, "", Issue("invalid_json", f"not UTF-8 text: {e}")
        return
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        yield 1, "", Issue("invalid_json", "expected a JSON array of rows")
        return
    i += 1
    line, counted = 1, 0
    while True:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if text.startswith("]", i):
            return
        line += text.count("\n", counted, i)
        counted = i
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError as e:
            yield line, "", Issue("invalid_json", f"not valid JSON: {e}")
            return
        except RecursionError:
            yield line, "", Issue("invalid_json", "JSON nested too deeply to parse")
            return
        chunk = text[i:end]
        if not isinstance(obj, dict):
            yield line, chunk, Issue("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
        elif _bad_unicode(chunk, obj):
            yield line, chunk, Issue("invalid_json", "not valid Unicode text (a lone surrogate)")
        else:
            yield line, chunk, obj
        i = end
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if text.startswith(",", i):
            i += 1
        elif not text.startswith("]", i):
            line += text.count("\n", counted, i)
            counted = i
            yield line, "", Issue("invalid_json", "expected ',' or ']' after an array element")
            return


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"\xef\xbb\xbf[") or head.startswith(b"[")


def iter_row_records(path: str | Path, opts: ReadOptions = ReadOptions()) -> Iterator[Record]:
    """ms-swift-style rows from a ``.jsonl`` file or a ``.json`` array, any layout of :mod:`layouts`.

    Relative image paths resolve against ``data.image_base``, the file's folder, then ``data.image_roots``.
    """
    path = Path(path)
    resolve = opts.resolver(path.parent, path.parent)
    if _is_json_array(path):
        rows = _json_array(path)
    else:
        rows = _one_document(path) if path.suffix == ".json" else None
        rows = rows or _json_lines(path)
    return row_records(rows, opts, resolve, path.stem)


def _one_document(path: Path) -> list[tuple[int, str, Any]] | None:
    """A ``.json`` file holding one (pretty-printed) row object; None when it is not one JSON document."""
    try:
        text = path.read_text(encoding="utf-8-sig")
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None  # JSON lines under a .json name, or broken: the line reader reports it line by line
    if not isinstance(obj, dict):
        return [(1, text, Issue("invalid_json", f"expected a JSON array of rows, got {type(obj).__name__}"))]
    return [(1, text, obj)]


def iter_swift_records(path: str | Path, allow_remote: bool = False) -> Iterator[Record]:
    """ms-swift rows (kept for callers of the old name): :func:`iter_row_records` with default options."""
    return iter_row_records(path, ReadOptions(allow_remote=allow_remote))

# ------------------------------------------------------------------------------------------ JSON documents


def _load_document(path: Path) -> dict[str, Any] | Record:
    try:
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        return Record(e.lineno, None, errors=[Issue("invalid_json", f"not valid JSON: {e}")])
    except UnicodeDecodeError as e:
        return Record(1, None, errors=[Issue("invalid_json", f"not UTF-8 text: {e}")])
    except RecursionError:
        return Record(1, None, errors=[Issue("invalid_json", "JSON nested too deeply to parse")])
    if _bad_unicode(text, doc):
        return Record(1, None, errors=[Issue("invalid_json", "not valid Unicode text (a lone surrogate)")])
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        return Record(1, None, errors=[Issue("bad_schema", "expected an object with an 'images' list")])
    return doc


def _first_dir(candidates: list[Path], fallback: Path) -> Path:
    return next((c for c in candidates if c.is_dir()), fallback)


def coco_paths(path: str | Path, split: str | None = None) -> tuple[Path, Path, Path]:
    """(annotation file, image folder, dataset root) for a COCO root folder or annotation file."""
    path = Path(path)
    if path.is_dir():
        root = path
        if split is None:
            found = sorted((root / "annotations").glob("captions_*.json"))
            if not found:
                raise ValueError(f"{root}: no annotations/captions_<split>.json")
            ann = found[0]
        else:
            ann = root / "annotations" / f"captions_{split}.json"
    else:
        ann = path
        root = path.parent.parent if path.parent.name == "annotations" else path.parent
    if not ann.is_file():
        raise ValueError(f"{ann}: COCO annotation file not found")
    split = ann.stem[len("captions_"):] if ann.stem.startswith("captions_") else ""
    candidates = [root / split, root / "images" / split] if split else []
    image_dir = _first_dir(candidates + [root / "images"], root)
    return ann, image_dir, root


def iter_coco_records(path: str | Path, split: str | None = None, allow_remote: bool = False,
                      opts: ReadOptions | None = None) -> Iterator[Record]:
    """One caption item per COCO image entry, carrying all of that image's reference captions."""
    opts = opts or ReadOptions(allow_remote=allow_remote)
    ann, image_dir, root = coco_paths(path, split)
    doc = _load_document(ann)
    if isinstance(doc, Record):
        yield doc
        return
    captions: dict[Any, list[str]] = {}
    for a in doc.get("annotations") or []:
        # An id must be a JSON scalar: a list/object id (hostile or broken file) is unhashable.
        if isinstance(a, dict) and isinstance(a.get("caption"), str) and not isinstance(a.get("image_id"),
                                                                                      (list, dict)):
            captions.setdefault(a.get("image_id"), []).append(a["caption"].strip())
    resolve = opts.resolver(image_dir, root)
    for n, entry in enumerate(doc["images"], 1):
        if not isinstance(entry, dict) or "id" not in entry or isinstance(entry["id"], (list, dict)) \
                or not isinstance(entry.get("file_name"), str):
            yield Record(n, None, errors=[Issue("bad_schema", "image entry needs 'id' (a number or string) "
                                                              "and 'file_name'")])
            continue
        refs = [c for c in captions.get(entry["id"], []) if c]
        item = Item(id=f"coco-{entry['id']}", split=None, task="caption", question=CAPTION_PROMPT,
                    images=[entry["file_name"]], solution="", references=refs,
                    extra={"source": "coco", "file_name": entry["file_name"]})
        rs, errs = _resolve_all(item.images, resolve)
        key = json.dumps({"image": entry, "captions": refs}, sort_keys=True)
        yield Record(n, item, rs, errs, key=key)


def flickr_paths(path: str | Path) -> tuple[Path, Path, Path]:
    """(Karpathy json, image folder, dataset root) for a Flickr30k root folder or its json file."""
    path = Path(path)
    ann = path / "dataset_flickr30k.json" if path.is_dir() else path
    if not ann.is_file():
        raise ValueError(f"{ann}: Karpathy split file not found")
    root = ann.parent
    image_dir = _first_dir([root / "flickr30k-images", root / "flickr30k_images", root / "images"], root)
    return ann, image_dir, root


def iter_flickr_records(path: str | Path, allow_remote: bool = False, opts: ReadOptions | None = None
                        ) -> Iterator[Record]:
    """One caption item per Karpathy image entry (``filename``, ``sentences[].raw``, ``split``)."""
    opts = opts or ReadOptions(allow_remote=allow_remote)
    ann, image_dir, root = flickr_paths(path)
    doc = _load_document(ann)
    if isinstance(doc, Record):
        yield doc
        return
    resolve = opts.resolver(image_dir, root)
    for n, entry in enumerate(doc["images"], 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            yield Record(n, None, errors=[Issue("bad_schema", "image entry needs a 'filename'")])
            continue
        name = entry["filename"]
        rel = f"{entry['filepath']}/{name}" if isinstance(entry.get("filepath"), str) else name
        refs = [str(s.get("raw", "")).strip() for s in entry.get("sentences") or [] if isinstance(s, dict)]
        refs = [r for r in refs if r]
        errors = []
        split = entry.get("split")
        if split is not None:
            mapped = SPLIT_ALIASES.get(str(split).lower())
            if mapped is None:
                errors.append(Issue("bad_schema", f"split {split!r} is not one of train, val, test, restval"))
            split = mapped
        ident = entry.get("imgid", Path(name).stem)
        item = Item(id=f"flickr30k-{ident}", split=split, task="caption", question=CAPTION_PROMPT,
                    images=[rel], solution="", references=refs,
                    extra={"source": "flickr30k", "file_name": name})
        rs, errs = _resolve_all(item.images, resolve)
        yield Record(n, item, rs, errors + errs, key=json.dumps(entry, sort_keys=True))
