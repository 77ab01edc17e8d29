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

Line numbers: for JSON lines a record's ``line`` is its line in the file; for a JSON array, the 1-based
position of the element in the array (its row: findings say ``row N``); for a Hugging Face dataset, the
1-based row number. COCO and Flickr30k are one JSON document, so there ``line`` is the 1-based position of
the entry in the file's ``images`` array (COCO: the image entry that all its captions attach to); a file
that is not valid JSON at all is reported at the line the JSON parser stopped on.

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
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from vlgrpo.data.hf import is_hf_folder, iter_hf_records
from vlgrpo.data.images import Issue
from vlgrpo.data.manifest import IMAGE_TAG, SPLITS, Item
# The record types and the row step live in vlgrpo.data.records, below both readers (hf.py needs them too).
# ImageRef is imported for the callers that find the record types here (build, validation).
from vlgrpo.data.records import (SPLIT_ALIASES, TASK_NAMES, ImageRef, PathResolver, ReadOptions,  # noqa: F401
                                 Record, resolve_all, row_records)

KINDS = ("manifest", "jsonl", "hf", "coco", "flickr30k")
CAPTION_PROMPT = f"{IMAGE_TAG}Describe this image in one sentence."
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
        if is_json_array(path):
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
        refs, errs = resolve_all(item.images, resolve)
        videos = [resolve_all(v, resolve) for v in item.videos]
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


def _json_array(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(row, element text, element or Issue) for each element of a JSON array file.

    Elements are decoded one at a time and numbered by their 1-based position in the array (``json.dump``
    writes the whole array on one line, so a line number would name every row alike); a syntax error stops
    the file there (there is no way to resynchronise inside a broken JSON document) and is reported at the
    row it broke in.
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
    row = 0
    while True:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if text.startswith("]", i):
            return
        row += 1
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError as e:
            yield row, "", Issue("invalid_json", f"not valid JSON: {e}")
            return
        except RecursionError:
            yield row, "", Issue("invalid_json", "JSON nested too deeply to parse")
            return
        chunk = text[i:end]
        if not isinstance(obj, dict):
            yield row, chunk, Issue("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
        elif _bad_unicode(chunk, obj):
            yield row, chunk, Issue("invalid_json", "not valid Unicode text (a lone surrogate)")
        else:
            yield row, chunk, obj
        i = end
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if text.startswith(",", i):
            i += 1
        elif not text.startswith("]", i):
            yield row, "", Issue("invalid_json", "expected ',' or ']' after an array element")
            return


def is_json_array(path: str | Path) -> bool:
    """Whether ``path`` holds a JSON array (its records are numbered by row, not by line)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"\xef\xbb\xbf[") or head.startswith(b"[")


def iter_row_records(path: str | Path, opts: ReadOptions = ReadOptions()) -> Iterator[Record]:
    """ms-swift-style rows from a ``.jsonl`` file or a ``.json`` array, any layout of :mod:`layouts`.

    Relative image paths resolve against ``data.image_base``, the file's folder, then ``data.image_roots``.
    """
    path = Path(path)
    resolve = opts.resolver(path.parent, path.parent)
    if is_json_array(path):
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
        rs, errs = resolve_all(item.images, resolve)
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
        rs, errs = resolve_all(item.images, resolve)
        yield Record(n, item, rs, errors + errs, key=json.dumps(entry, sort_keys=True))
