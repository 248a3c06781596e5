"""A large dataset's start-up: a Hugging Face dataset of N rows (default 1M; Parquet, an image-path column and a caption
column) over N tiny image files in three aspect ratios, made on the fly, trained on aspect-ratio buckets.

The first start validates every row and reads every image header into the index (<output_dir>/data-index.parquet); a
later start (a new process, as a restarted job is) reuses the index and only stats the files. Each start is timed from
an empty process to 100 micro-batches drawn (one bucket each). Prints a table and writes
benchmarks/results/dataset_index.json.

    python benchmarks/dataset_index.py [--rows 1000000] [--work /tmp/danceopd-1m]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(16, 16), (24, 16), (16, 24)]  # pixels: three aspect ratios (the buckets: 1:1, 3:2, 2:3 at 16 px)
PER_FOLDER = 1000


def make_dataset(work: Path, rows: int) -> Path:
    """N PNG files (1000 per folder; each a distinct tiny image) and a Parquet dataset naming them."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    ds = work / "dataset"
    if (ds / "data.parquet").exists() and pq.read_metadata(ds / "data.parquet").num_rows == rows:
        return ds
    rng = np.random.default_rng(0)
    blobs = {}
    for w, h in SIZES:  # one encoded PNG per shape; each file differs in its first pixel's bytes below
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG", compress_level=0)
        blobs[(w, h)] = buf.getvalue()
    paths, captions = [], []
    for i in range(rows):
        folder = ds / "images" / f"{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        rel = f"images/{i // PER_FOLDER:04d}/{i:07d}.png"
        (ds / rel).write_bytes(blobs[SIZES[i % 3]])
        paths.append(rel)
        captions.append(f"a tiny picture number {i}")
    pq.write_table(pa.table({"caption": captions, "image": paths}), ds / "data.parquet")
    return ds


CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from danceopd.config import load_config
ds, out, base = sys.argv[1:4]
cfg = load_config(None, {"student.base": base, "output_dir": out, "device": "cpu", "routes": {"t2i": {"teacher": {}}},
                         "data.sources": [{"path": ds, "route": "t2i", "columns": {"prompt": "caption", "target_image": "image"}}],
                         "data.buckets": [[16, 16], [24, 16], [16, 24]], "data.eval_fraction": 0.001})
t_valid = time.perf_counter() - t0
bucket = cfg.manifest.bucket("t2i")
sizes = [bucket.sample_sized(8, seed)[1] for seed in range(100)]
t_sampled = time.perf_counter() - t0
import pyarrow.parquet as pq
print(json.dumps({"rows": len(cfg.manifest) + len(cfg.eval_manifest), "validated_s": t_valid, "sampled_s": t_sampled,
                  "index_entries": pq.read_metadata(cfg.data_index()).num_rows, "buckets": {f"{w}x{h}": n for (w, h), n in
                  sorted({b: len(ix) for b, ix in bucket.by_size.items()}.items())}, "draws_per_bucket": {f"{w}x{h}": sizes.count((w, h)) for w, h in sorted(set(sizes))}}))
"""


def start(ds: Path, out: Path, base: Path) -> dict:
    """One start in a fresh process: validation (and indexing), then 100 draws."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, str(ds), str(out), str(base)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/danceopd-dataset-index"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dataset_index.json")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from danceopd.testing.tiny import build_tiny_pipeline

    args.work.mkdir(parents=True, exist_ok=True)
    base = args.work / "tiny-flux"
    if not (base / "model_index.json").exists():
        build_tiny_pipeline("flux", base, seed=0, sample_size=16)
    t0 = time.perf_counter()
    ds = make_dataset(args.work, args.rows)
    made = time.perf_counter() - t0
    out = args.work / "runs"
    (out / "data-index.parquet").unlink(missing_ok=True)  # a cold first start: no header index, no validated rows
    shutil.rmtree(out / "data-rows", ignore_errors=True)
    first = start(ds, out, base)
    later = start(ds, out, base)
    index_mb = (out / "data-index.parquet").stat().st_size / 2 ** 20
    print(f"{'start':<8}{'rows':>10}{'validated (s)':>15}{'100 draws (s)':>15}{'process (s)':>13}")
    for name, r in (("first", first), ("later", later)):
        print(f"{name:<8}{r['rows']:>10}{r['validated_s']:>15.1f}{r['sampled_s']:>15.1f}{r['process_s']:>13.1f}")
    print(f"dataset made in {made:.0f} s; index {index_mb:.1f} MiB, {first['index_entries']} images; buckets {first['buckets']}; "
          f"later start / first start: {later['sampled_s'] / first['sampled_s']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": args.rows, "made_s": made, "first": first, "later": later, "index_mib": index_mb}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
