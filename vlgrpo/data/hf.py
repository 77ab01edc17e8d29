"""Hugging Face datasets as a source (``data.source: hf``).

``data.path`` is one of:

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
  ``datasets.load_from_disk``, memory-mapped; a DatasetDict's split names become the rows' splits);
- a ``.parquet`` file (e.g. ``Dataset.to_parquet`` or a file from the Hub), or a folder of them (read in
  sorted order; a file named ``train-*`` / ``validation-*`` / ``test-*`` gives its rows that split).

Rows are read as plain Python values straight from Arrow (nothing is decoded by ``datasets``), then go
through the same layouts as JSON rows (:mod:`vlgrpo.data.layouts`): the R1-V / open-r1-multimodal columns
``image`` + ``problem`` + ``solution``, ``question`` / ``prompt`` and ``answer`` aliases, ``messages`` +
``images``, and so on; ``data.columns`` renames columns first. Image cells may be ``datasets.Image`` values
(``{"bytes", "path"}``: the bytes win, else the path), plain paths (relative to the dataset folder, same
rules as JSON rows) or raw bytes; a list column holds several. Every other column goes to rewards.

Row numbers (``line`` in findings) are 1-based and run on across the splits / files in reading order.
A folder or file that cannot be read at all gives one ``invalid_dataset`` error instead of rows.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from vlgrpo.data.images import Issue
from vlgrpo.data.records import SPLIT_ALIASES, ReadOptions, Record, row_records

BATCH_ROWS = 256


def is_hf_folder(path: Path) -> bool:
    """A ``save_to_disk`` folder (Dataset or DatasetDict) or a folder holding parquet files."""
    path = Path(path)
    return ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
            or next(path.rglob("*.parquet"), None) is not None)


def _cell_key(v: Any) -> Any:
    """JSON stand-in for values json cannot write (image bytes by digest), for duplicate-row keys."""
    if isinstance(v, (bytes, bytearray)):
        return "bytes:" + hashlib.blake2b(v, digest_size=16).hexdigest()
    return str(v)


def _file_split(name: str) -> str | None:
    """``train-00000-of-00001.parquet`` -> train (the Hub's naming); None when the name says nothing."""
    return SPLIT_ALIASES.get(name.split("-", 1)[0].split(".", 1)[0].lower())


def _parquet_batches(path: Path) -> Iterator[tuple[str | None, list[dict[str, Any]]]]:
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    for f in files:
        split = _file_split(f.name) if len(files) > 1 else None
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS):
            yield split, batch.to_pylist()


def _arrow_file_batches(path: Path) -> Iterator[tuple[str | None, list[dict[str, Any]]]]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        try:
            reader = pa.ipc.open_stream(src)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(src)
        table = reader.read_all()
    for batch in table.to_batches(BATCH_ROWS):
        yield None, batch.to_pylist()


def _disk_batches(path: Path) -> Iterator[tuple[str | None, list[dict[str, Any]]]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    parts = list(loaded.items()) if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for name, ds in parts:
        split = None if name is None else SPLIT_ALIASES.get(name.lower(), name)
        for table in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):
            yield split, table.to_pylist()


def _batches(path: Path) -> Iterator[tuple[str | None, list[dict[str, Any]]]]:
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _disk_batches(path)
    if path.suffix == ".arrow":
        return _arrow_file_batches(path)
    return _parquet_batches(path)


def _rows(path: Path) -> Iterator[tuple[int, str, Any]]:
    """(row number, duplicate key, row dict or an Issue) for every row; unreadable data -> one Issue."""
    n = 0
    try:
        for split, batch in _batches(path):
            for row in batch:
                n += 1
                if split is not None and "split" not in row:
                    row["split"] = split
                yield n, json.dumps(row, sort_keys=True, default=_cell_key), row
    except Exception as e:  # noqa: BLE001 - pyarrow / datasets raise many types for a damaged dataset
        yield max(n, 1), "", Issue("invalid_dataset", f"cannot be read as a Hugging Face dataset "
                                                      f"({type(e).__name__}: {str(e)[:300]})")


def iter_hf_records(path: str | Path, opts: ReadOptions = ReadOptions()) -> Iterator[Record]:
    """Records from a ``save_to_disk`` folder or parquet file(s); image paths resolve like JSON rows'."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return row_records(_rows(path), opts, opts.resolver(folder, folder), path.stem)


__all__ = ["is_hf_folder", "iter_hf_records"]
