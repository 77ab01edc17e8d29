"""The ``data`` stage core: turn the configured source into ``<out_dir>/manifest.jsonl`` + ``<out_dir>/cache/``.

    from vlgrpo.data.build import build_dataset
    summary = build_dataset(load_config("params.yaml"), Path("."))

- ``synthetic``: items and images come from :func:`vlgrpo.data.synthetic.generate` (deterministic in
  ``data.seed``); each image is fitted into the pixel budget and cached.
- ``jsonl`` / ``json`` / ``hf`` / ``coco`` / ``flickr30k``: rows come from :mod:`vlgrpo.data.sources` (any
  layout of :mod:`vlgrpo.data.layouts`; docs/datasets.md); every image is decoded,
  oriented, converted to RGB, resized into the budget and cached. Rows without a split get one from a hash
  of their first image's content (so one image never lands in two splits), ``data.val_fraction`` and
  ``data.test_fraction`` setting the proportions.
- Videos (frame folders / lists): every frame is normalised like an image, into ``data.min_pixels`` ..
  ``data.video_max_pixels``, and cached in the same content-addressed cache; the manifest row lists each
  video's cached frames.

Every row goes through the same checks as ``validate`` (:class:`vlgrpo.data.validation.RowChecker`); rows with an
error are left out and reported in the summary, warnings (converted, resized, duplicate rows) are repaired.

Atomicity: images are written one by one (each atomically, content-addressed, so a rerun reuses them); the
manifest is written to a temporary file and renamed over the old one only when complete, and cache files
that no manifest references any more are pruned only after that. A failure anywhere before the rename leaves
the previous manifest and every image it references untouched.
"""
from __future__ import annotations

import hashlib
import os
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from vlgrpo.config import Config
from vlgrpo.data.images import (ImageError, ImageInfo, Issue, cache_image, fit_image, inspect_image,
                                normalize_bytes, read_image_bytes, vision_block)
from vlgrpo.data.manifest import Item, write_manifest
from vlgrpo.data.sources import ImageRef, Record, iter_records, read_options
from vlgrpo.io import under_root
from vlgrpo.data.validation import RowChecker, check_records

REMOTE_TIMEOUT_S = 30


class BuildError(RuntimeError):
    """The data stage cannot produce a manifest; the message says why and where."""


class _Normaliser:
    """Loader for imported sources: decode + normalise + cache each distinct image once per run."""

    def __init__(self, cache_dir: Path, min_pixels: int, max_pixels: int, factor: int) -> None:
        self.cache_dir, self.min_pixels, self.max_pixels, self.factor = cache_dir, min_pixels, max_pixels, factor
        self.cached: dict[str, str] = {}                       # ref key -> cache path (manifest-relative)
        self._memo: dict[str, ImageInfo | ImageError] = {}

    @staticmethod
    def key(ref: ImageRef) -> str:
        if ref.data is not None:  # bytes held in the dataset: the same picture in two rows is one entry
            return "bytes:" + hashlib.blake2b(ref.data, digest_size=16).hexdigest()
        return ref.url if ref.path is None else str(ref.path)

    def __call__(self, ref: ImageRef) -> ImageInfo:
        k = self.key(ref)
        hit = self._memo.get(k)
        if hit is None:
            try:
                if ref.data is not None:
                    data, src = ref.data, ref.raw
                elif ref.path is None:
                    data, src = _fetch(ref.url), ref.raw
                else:
                    data, src = read_image_bytes(ref.path), ref.path
                img, hit = normalize_bytes(data, src, self.min_pixels, self.max_pixels, self.factor)
                self.cached[k] = cache_image(img, self.cache_dir)
            except ImageError as e:
                hit = e
            self._memo[k] = hit
        if isinstance(hit, ImageError):
            raise hit
        return hit


def _fetch(url: str) -> bytes:
    """Download a remote image (only reached when data.allow_remote is true)."""
    if not url.lower().startswith(("http://", "https://")):
        raise ImageError("remote_url", f"image {url!r}: only http(s) URLs can be fetched")
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as r:  # noqa: S310 - scheme checked
            return r.read()
    except OSError as e:
        raise ImageError("missing_image", f"image {url!r} could not be downloaded: {e}") from None


def _synthetic_records(cfg: Config, out: Path, cache_dir: Path, factor: int
                       ) -> tuple[Iterator[Record], Any]:
    """Generated items, each image fitted and cached; the loader re-reads the cached file's header."""
    from vlgrpo.data.synthetic import generate

    d = cfg.data
    pending: dict[str, tuple[Issue, ...]] = {}   # cache path -> warnings raised while fitting

    def cached(image: Any, name: str, max_pixels: int) -> str:
        img, issues = fit_image(image, d.min_pixels, max_pixels, name, factor)
        rel = cache_image(img, cache_dir)
        pending[rel] = tuple(issues)
        return rel

    def records() -> Iterator[Record]:
        for n, (item, image) in enumerate(generate(d), 1):
            if isinstance(image, list):  # a video task: its frames
                item.videos = [[cached(f, f"{item.id}-{k}.png", d.video_max_pixels) for k, f in enumerate(image)]]
                yield Record(n, item, [], key=item.to_json(),
                             videos=[[ImageRef(raw=rel, path=out / rel) for rel in item.videos[0]]])
                continue
            item.images = [cached(image, f"{item.id}.png", d.max_pixels)]
            yield Record(n, item, [ImageRef(raw=item.images[0], path=out / item.images[0])], key=item.to_json())

    def loader(max_pixels: int):
        def load(ref: ImageRef) -> ImageInfo:
            info = inspect_image(ref.path, d.min_pixels, max_pixels, factor=factor)
            extra = pending.pop(ref.raw, ())
            if extra:
                info = ImageInfo(info.width, info.height, info.mode, info.sha256, info.target,
                                 tuple(extra) + info.warnings, factor)
            return info
        return load

    return records(), (loader(d.max_pixels), loader(d.video_max_pixels))


def source_path(cfg: Config, root: Path) -> Path:
    """``data.path`` resolved against the project root."""
    return under_root(root, cfg.data.path)  # type: ignore[arg-type] - required for imported sources


def build_dataset(cfg: Config, root: str | Path) -> dict[str, Any]:
    """Write ``<root>/<data.out_dir>/manifest.jsonl`` and its image cache; return a summary dict.

    Raises :class:`BuildError` when no row survives (the previous manifest stays in place).
    """
    root = Path(root)
    d = cfg.data
    out = under_root(root, d.out_dir)
    cache_dir = out / "cache"
    manifest = out / "manifest.jsonl"
    # images are resized to multiples of the model's visual-token block, so the processor never resizes again
    factor = vision_block(cfg.base.model)
    if d.source == "synthetic":
        records, (load, load_frame) = _synthetic_records(cfg, out, cache_dir, factor)
        source: object = "synthetic"
        normaliser = frames = None
    else:
        src = source_path(cfg, root)
        if not src.exists():
            raise BuildError(f"data.path: {src} does not exist (data.source is {d.source!r})")
        opts = read_options(d, root, coco_split=d.split if d.source == "coco" else None)
        records = iter_records(src, d.source, opts)
        load = normaliser = _Normaliser(cache_dir, d.min_pixels, d.max_pixels, factor)
        load_frame = frames = _Normaliser(cache_dir, d.min_pixels, d.video_max_pixels, factor)
        source = src

    checker = RowChecker(cfg, source, load, factor=factor, load_frame=load_frame)
    kept, findings, stats = check_records(records, checker)
    if not kept:
        raise BuildError(f"{source}: no valid rows out of {stats['rows']}; first problems: "
                         + "; ".join(f["message"] for f in findings[:3]))

    items: list[Item] = []
    for c in kept:
        if normaliser is not None and frames is not None:
            c.item.images = [normaliser.cached[normaliser.key(r)] for r in c.refs]
            c.item.videos = [[frames.cached[frames.key(r)] for r in v] for v in c.videos]
        items.append(c.item)
    write_manifest(manifest, items)
    referenced = {p for it in items for p in it.images + [f for v in it.videos for f in v]}
    pruned = prune_cache(out, cache_dir, referenced)

    counts = Counter(f["check"] for f in findings)
    return {
        "source": d.source,
        "input": str(source),
        "manifest": str(manifest),
        "rows": len(items),
        "input_rows": stats["rows"],
        "dropped_errors": stats["error_rows"],
        "dropped_duplicates": stats["duplicates"],
        "splits": dict(sorted(Counter(it.split for it in items).items())),
        "tasks": dict(sorted(Counter(it.task for it in items).items())),
        "images": len(referenced),
        "pruned_images": pruned,
        "counts": dict(sorted(counts.items())),
        "findings": findings,
    }


def prune_cache(out: Path, cache_dir: Path, referenced: set[str]) -> int:
    """Delete cache files the new manifest does not reference (run only after it is in place)."""
    if not cache_dir.is_dir():
        return 0
    removed = 0
    for dirpath, _dirs, files in os.walk(cache_dir, topdown=False):
        for name in files:
            p = Path(dirpath) / name
            if p.relative_to(out).as_posix() not in referenced:
                p.unlink(missing_ok=True)
                removed += 1
        if Path(dirpath) != cache_dir and not os.listdir(dirpath):
            os.rmdir(dirpath)
    return removed
