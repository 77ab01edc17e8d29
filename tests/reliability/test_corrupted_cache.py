"""Corrupted caches: one byte flipped on disk, after its stage ran, in a cached normalised image and in
`models/base`. Each is found by its content hash before it is used (the image cache is content-addressed:
a file's name is the sha256 of its bytes; a model folder carries the sha256 of each file), with a message
naming the file and the command that rebuilds it; that command restores the exact bytes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.project import run
from tests.reliability.conftest import VLGRPO

pytestmark = pytest.mark.reliability


def _flip(path: Path, offset: int) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1:])
    return data


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_flipped_byte_in_cached_image_is_found_before_use_and_rebuilt_by_the_data_stage(project, cli_env):
    from vlgrpo.config import load_config
    from vlgrpo.data.build import build_dataset
    from vlgrpo.data.manifest import read_manifest

    # A validation image: the base stage scores every one of them, so it is certainly used.
    item = read_manifest(project / "data/manifest.jsonl", split="val")[0]
    image = project / "data" / item.images[0]
    original = _flip(image, len(image.read_bytes()) // 2)      # inside the compressed pixel data
    base_before = _tree(project / "models/base")

    p = run([VLGRPO, "base"], project, timeout=300, check=False, **cli_env)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1, p.stderr[-3000:]
    assert str(image) in last and "`vlgrpo data`" in last and "corrupt" in last, last
    assert _tree(project / "models/base") == base_before            # nothing was written from it

    # The data stage writes the damaged file again (same name = same bytes) and only that file.
    cache_before = _tree(project / "data/cache")
    build_dataset(load_config(project / "params.yaml"), project)
    assert image.read_bytes() == original
    changed = {k for k, v in _tree(project / "data/cache").items() if cache_before.get(k) != v}
    assert changed == {image.relative_to(project / "data/cache").as_posix()}


def test_flipped_byte_in_models_base_is_found_before_use(project):
    from vlgrpo.model import loading
    from vlgrpo.config import load_config
    from vlgrpo.io import ContentMismatch
    from vlgrpo.train.loop import train_grpo
    from vlgrpo.train.paths import RunPaths

    weights = project / "models/base/model.safetensors"
    _flip(weights, weights.stat().st_size - 100)                  # a weight value, not the header
    cfg = load_config(project / "params.yaml")
    want = rf"{weights}: content changed since it was written .*rebuild it with `vlgrpo base`"
    with pytest.raises(ContentMismatch, match=want):
        loading.load_model(project / "models/base")             # evaluate's and the pilot's load path
    with pytest.raises(ContentMismatch, match=want):
        train_grpo(cfg, RunPaths.under(project, "data/manifest.jsonl", "models/base", "models/candidate",
                                       "reports/train_metrics.jsonl"), progress=False)
    assert not (project / "models/candidate").exists()
    assert not (project / "reports/train_metrics.jsonl").exists()
