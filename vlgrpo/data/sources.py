"""Readers for the data the pipeline accepts, each yielding :class:`Record` s with 1-based line numbers.

Kinds (``detect_kind`` tells them apart, so ``vlgrpo validate --data`` accepts any of them):

- ``manifest``  - our own ``manifest.jsonl`` (schema in :mod:`vlgrpo.data.manifest`).
- ``jsonl``     - the ms-swift GRPO format: one object a line with ``messages`` (chat turns; ``<image>`` in the
  user text marks where an image goes), ``images`` (paths relative to the file's folder, or
  ``{"path": ...}`` dicts), ``solution``, and any extra columns (kept in ``Item.extra``, passed to rewards).
- ``coco``      - COCO captions: ``<root>/annotations/captions_<split>.json`` + an image folder.
- ``flickr30k`` - the Karpathy split file ``<root>/dataset_flickr30k.json`` + an image folder.

Line numbers: for the JSON-lines kinds a record's ``line`` is its line in the file. COCO and Flickr30k are
one JSON document, so there ``line`` is the 1-based position of the entry in the file's ``images`` array
(COCO: the image entry that all its captions attach to); a file that is not valid JSON at all is reported at
the line the JSON parser stopped on.

Image paths are confined to the dataset's folder: ``..``, an absolute path elsewhere, or a symlink whose
target lies outside (checked with ``Path.resolve``) is a ``path_escape`` error; a URL (``http://``,
``s3://``, ...) is a ``remote_url`` error unless ``data.allow_remote`` is true.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from vlgrpo.data.images import Issue
from vlgrpo.data.manifest import IMAGE_TAG, SPLITS, Item

KINDS = ("manifest", "jsonl", "coco", "flickr30k")
# Task names a manifest may carry: the synthetic ones plus 'vqa' for imported question/answer rows.
TASK_NAMES = ("count", "color", "shape", "exists", "caption", "vqa", "ground")
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
_SWIFT_KEYS = {"messages", "images", "solution", "id", "split", "task", "references", "system", "query",
               "response"}


@dataclass
class ImageRef:
    """One image reference as written in the source, and where it points."""
    raw: str
    path: Path | None = None     # resolved local file (None for a remote URL)
    url: str | None = None


@dataclass
class Record:
    """One row of a source: an item candidate, or only the reasons it could not become one.

    ``item.split`` is None when the source has no split (assigned later from the image content).
    ``key`` is the row's exact content, for duplicate-row detection.
    """
    line: int
    item: Item | None
    refs: list[ImageRef] = field(default_factory=list)
    errors: list[Issue] = field(default_factory=list)
    key: str | None = None


class PathResolver:
    """Resolve image references against a base folder and confine them to ``root``; memoised per run."""

    def __init__(self, base: Path, root: Path, allow_remote: bool) -> None:
        self.base = Path(base)
        self.root = Path(root).resolve()
        self.allow_remote = allow_remote
        self._memo: dict[str, ImageRef | Issue] = {}

    def __call__(self, raw: str) -> ImageRef | Issue:
        hit = self._memo.get(raw)
        if hit is None:
            hit = self._memo[raw] = self._resolve(raw)
        return hit

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
        p = Path(raw_path)
        if not p.is_absolute():
            p = self.base / p
        try:
            resolved = p.resolve()  # follows symlinks, so a link pointing out is caught too
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
            return Issue("missing_image", f"image {raw[:200]!r} cannot be resolved: "
                                          f"{getattr(e, 'strerror', None) or e}")
        if not resolved.is_relative_to(self.root):
            return Issue("path_escape",
                         f"image {raw!r} resolves to {resolved}, outside the dataset folder {self.root}")
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
    """Which reader a file (or a COCO / Flickr30k root folder) needs; ValueError naming the file if none."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_flickr30k.json").is_file():
            return "flickr30k"
        if sorted((path / "annotations").glob("captions_*.json")):
            return "coco"
        raise ValueError(f"{path}: a folder, but neither a COCO root (annotations/captions_<split>.json) "
                         f"nor a Flickr30k root (dataset_flickr30k.json)")
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    if path.suffix == ".json":
        if path.name.startswith("dataset_"):
            return "flickr30k"
        if path.name.startswith("captions_"):
            return "coco"
        head = _read_head(path)
        if '"sentences"' in head:
            return "flickr30k"
        if '"annotations"' in head or '"caption"' in head:
            return "coco"
        raise ValueError(f"{path}: a .json file that is neither COCO captions nor a Karpathy split file")
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


def _read_head(path: Path, n: int = 1 << 16) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(n)


def iter_records(path: str | Path, kind: str | None = None, *, allow_remote: bool = False,
                 coco_split: str | None = None) -> Iterator[Record]:
    """Records of any kind; ``path`` is the file (or, for COCO / Flickr30k, the file or its root folder)."""
    path = Path(path)
    kind = kind or detect_kind(path)
    if kind == "manifest":
        return iter_manifest_records(path, allow_remote=allow_remote)
    if kind == "jsonl":
        return iter_swift_records(path, allow_remote=allow_remote)
    if kind == "coco":
        return iter_coco_records(path, split=coco_split, allow_remote=allow_remote)
    if kind == "flickr30k":
        return iter_flickr_records(path, allow_remote=allow_remote)
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
        yield Record(n, item, refs, errors + errs, key=text)


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


def _content_text(content: Any) -> str:
    """Chat content as text: a string, or a list of parts where image parts become ``<image>`` tags."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                kind = part.get("type")
                if kind == "text":
                    parts.append(str(part.get("text", "")))
                elif kind in ("image", "image_url"):
                    parts.append(IMAGE_TAG)
        return "".join(parts)
    return str(content)


def _swift_images(obj: dict[str, Any]) -> list[str] | Issue:
    images = obj.get("images", [])
    if images is None:
        return []
    if isinstance(images, (str, dict)):
        images = [images]
    if not isinstance(images, list):
        return Issue("bad_schema", f"'images' must be a list, got {type(images).__name__}")
    out = []
    for im in images:
        if isinstance(im, dict) and isinstance(im.get("path"), str):
            out.append(im["path"])
        elif isinstance(im, str):
            out.append(im)
        else:
            return Issue("bad_schema", f"an 'images' entry must be a path or {{'path': ...}}, got {im!r}"[:200])
    return out


def swift_item(obj: dict[str, Any], line: int, stem: str) -> tuple[Item, list[Issue]]:
    """Turn one ms-swift row into an Item (split None when the row has none) plus row-level problems."""
    errors: list[Issue] = []
    messages = obj.get("messages")
    system = obj.get("system")
    question, history, answer = "", [], None
    if isinstance(messages, list):
        turns = [m for m in messages if isinstance(m, dict)]
        users = [i for i, m in enumerate(turns) if m.get("role") == "user"]
        for m in turns:
            if m.get("role") == "system" and system is None:
                system = _content_text(m.get("content"))
        if users:
            last = users[-1]
            question = _content_text(turns[last].get("content"))
            history = [{"role": m.get("role"), "content": _content_text(m.get("content"))}
                       for m in turns[:last] if m.get("role") != "system"]
            after = [m for m in turns[last + 1:] if m.get("role") == "assistant"]
            if after:
                answer = _content_text(after[-1].get("content"))
    elif messages is not None:
        errors.append(Issue("bad_schema", f"'messages' must be a list of turns, got {type(messages).__name__}"))
    elif "query" in obj:  # ms-swift's query/response variant
        question = _content_text(obj.get("query"))
        answer = obj.get("response")

    images = _swift_images(obj)
    if isinstance(images, Issue):
        errors.append(images)
        images = []
    tags = question.count(IMAGE_TAG) + sum(str(h["content"]).count(IMAGE_TAG) for h in history)
    if tags == 0 and images:
        question = IMAGE_TAG * len(images) + question  # ms-swift puts untagged images before the text
    elif tags != len(images):
        errors.append(Issue("image_tag_mismatch",
                            f"{tags} {IMAGE_TAG} tag(s) but {len(images)} image(s); "
                            "the model would see mismatched image tokens"))

    solution = obj.get("solution", answer)
    solution = "" if solution is None else (solution if isinstance(solution, str) else json.dumps(solution))
    task = obj.get("task") if obj.get("task") in TASK_NAMES else "vqa"
    refs = obj.get("references")
    references = [str(r) for r in refs] if isinstance(refs, list) else []
    if task == "caption" and not references and solution.strip():
        references = [solution]
    split = obj.get("split")
    if split is not None:
        mapped = SPLIT_ALIASES.get(str(split).lower())
        if mapped is None:
            errors.append(Issue("bad_schema", f"split {split!r} is not one of {', '.join(SPLITS)}"))
        split = mapped
    extra = {k: v for k, v in obj.items() if k not in _SWIFT_KEYS}
    if history:
        extra["history"] = history
    item = Item(id=str(obj["id"]) if obj.get("id") is not None else f"{stem}-{line}", split=split,
                task=task, question=question, images=images, solution=solution, references=references,
                scene=None, system=system if isinstance(system, str) else None, extra=extra)
    return item, errors


def iter_swift_records(path: str | Path, allow_remote: bool = False) -> Iterator[Record]:
    """ms-swift JSONL; image paths are relative to the file's folder and confined to it."""
    return _jsonl_records(path, allow_remote, swift_item)


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


def iter_coco_records(path: str | Path, split: str | None = None, allow_remote: bool = False
                      ) -> Iterator[Record]:
    """One caption item per COCO image entry, carrying all of that image's reference captions."""
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
    resolve = PathResolver(image_dir, root, allow_remote)
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


def iter_flickr_records(path: str | Path, allow_remote: bool = False) -> Iterator[Record]:
    """One caption item per Karpathy image entry (``filename``, ``sentences[].raw``, ``split``)."""
    ann, image_dir, root = flickr_paths(path)
    doc = _load_document(ann)
    if isinstance(doc, Record):
        yield doc
        return
    resolve = PathResolver(image_dir, root, allow_remote)
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
