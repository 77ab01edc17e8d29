"""Benchmark: ``validate_file`` on a 100k-row manifest whose images are already cached (target >= 2,000 rows/s).

    .venv/bin/python -m tests.benchmarks.bench_validate [--rows 100000] [--images 500]

Not a pytest test (timings are not asserted). Builds a manifest in a temp dir: ``--images`` distinct 112x112
PNGs in the content-addressed cache, and ``--rows`` VQA rows spread over them (every image keeps one split,
as a real dataset with many questions per image would). Then, in this one fresh process:

- ``validate_file`` end to end (row checks, the Great Expectations suite, Data Docs, report), plus the
  lazy imports it pays on first use (qwen_vl_utils pulls in torch; great_expectations), which count
  towards the headline rate and are also shown apart;
- the peer: only ``json.loads`` of every line of the same file, the floor any validator pays.

Prints ``rows_per_s=``, ``ratio_vs_target=`` (rows/s / 2000) and the peer's numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from tests.settings import tuned_config

TARGET_ROWS_PER_S = 2000.0


def make_manifest(out: Path, rows: int, images: int) -> Path:
    from PIL import Image

    from vlgrpo.data.images import cache_image
    from vlgrpo.data.manifest import Item

    rels = []
    for i in range(images):
        img = Image.new("RGB", (112, 112), (i % 256, (i * 7) % 256, (i * 13) % 256))
        img.putpixel((i % 112, (i // 112) % 112), (255 - i % 256, 0, 0))
        rels.append(cache_image(img, out / "cache"))
    splits = ("train", "train", "train", "train", "train", "train", "train", "train", "val", "test")
    path = out / "manifest.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in range(rows):
            k = r % images
            it = Item(id=f"bench-{r:07d}", split=splits[k % 10], task=("count", "color", "caption")[r % 3],
                      question=f"<image>How many red circles are there in picture {r}? Answer with a number.",
                      images=[rels[k]], solution=str(r % 5) if r % 3 != 2 else "",
                      references=["a red circle and a blue square"] if r % 3 == 2 else [],
                      scene={"width": 112, "height": 112, "objects": [{"shape": "circle", "color": "red",
                                                                        "size": 30, "x": 40, "y": 50}]})
            f.write(it.to_json() + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=500)
    args = ap.parse_args()

    from vlgrpo.data.validation import validate_file

    with tempfile.TemporaryDirectory(prefix="bench_validate_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        manifest = make_manifest(tmp / "data", args.rows, args.images)
        print(f"setup: {args.rows} rows on {args.images} cached images in {time.perf_counter() - t0:.1f}s "
              f"({manifest.stat().st_size / 1e6:.1f} MB)")

        t0 = time.perf_counter()
        n = 0
        with open(manifest, encoding="utf-8") as f:
            for line in f:
                json.loads(line)
                n += 1
        peer_s = time.perf_counter() - t0

        # The one-off lazy imports validate_file pays on first use, timed apart (they are not per-row work).
        t0 = time.perf_counter()
        import great_expectations  # noqa: F401

        from vlgrpo.data.images import smart_resize
        smart_resize(112, 112, 3136, 12544)                # imports qwen_vl_utils (and torch)
        import_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        res = validate_file(manifest, tuned_config(), tmp / "reports" / "validate.json", tmp / "reports" / "data_docs")
        work_s = time.perf_counter() - t0
        total_s = import_s + work_s

    assert res.ok and res.valid_rows == args.rows, (res.ok, res.counts)
    rate = args.rows / total_s
    print(f"validate_file: {total_s:.2f}s for {args.rows} rows incl. {import_s:.2f}s of one-off imports "
          f"(ok={res.ok}, cores={os.cpu_count()}, load avg {os.getloadavg()[0]:.1f})")
    print(f"rows_per_s={rate:.0f}  (excluding imports: {args.rows / work_s:.0f})")
    print(f"ratio_vs_target={rate / TARGET_ROWS_PER_S:.2f}")
    print(f"peer json.loads only: {peer_s:.2f}s, rows_per_s={n / peer_s:.0f}; "
          f"validate/peer time ratio={total_s / peer_s:.1f}")


if __name__ == "__main__":
    main()
