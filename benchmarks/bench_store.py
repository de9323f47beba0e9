"""What the feature store costs: featx's writer, and HDF5 layouts (dtype, chunk size, compression).

Usage::

    python benchmarks/bench_store.py [--n 50000] [--dims 1280] [--features STORE.h5] [--quick]

Features are real ones when ``--features`` names a featx store (its rows are tiled up to ``--n``), else
non-negative synthetic ones shaped like pooled ReLU activations. Timed:

* **featx's writer**: ``StoreWriter.write_batch`` per batch of 64 (each an atomic ``.npz`` part, fsync'd)
  plus ``finalize`` (assembling the HDF5 file), float32 and float16: the store's share of an extraction;
* **plain h5py** layouts written chunk by chunk into a preallocated dataset, then read whole and by 1,000
  scattered rows: chunk rows × compression (none, lzf, gzip 1/4) × dtype, with the file size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, machine_line, table

BATCH = 64


def features(n: int, dims: int, source: str | None) -> np.ndarray:
    if source:
        import featx.store

        with featx.store.open(source) as s:
            real = s.features(dtype=np.float32)
        return np.resize(real, (n, real.shape[1]))
    rng = np.random.default_rng(0)
    return np.maximum(rng.normal(0.2, 0.5, size=(n, dims)), 0).astype(np.float32)


def featx_writer(X: np.ndarray, dtype: str, work: Path) -> dict:
    from featx.data import Manifest
    from featx.spec import ExtractionSpec, Preprocessing, cache_key
    from featx.store import StoreWriter

    n, dims = X.shape
    ids = [f"img{i:07d}.jpg" for i in range(n)]
    manifest = Manifest(
        ids, [f"/bench/{i}" for i in ids], np.zeros(n, dtype=np.int64), ["train"] * n, ["c"], "bench", "from source"
    )
    spec = ExtractionSpec(
        backbone="featx:bench",
        weights="none",
        weights_sha256="0" * 64,
        layers=("penultimate",),
        preprocessing=Preprocessing((224, 224), 256, "bicubic", (0.5,) * 3, (0.5,) * 3),
        dtype=dtype,
    )
    fp = manifest.images_fingerprint()  # what extract() keys a store by
    path = work / f"featx-{dtype}.h5"
    path.unlink(missing_ok=True)
    with StoreWriter(path, spec, cache_key(spec, fp), manifest, fp, {"penultimate": dims}) as writer:
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            rows = np.arange(start, min(n, start + BATCH))
            writer.write_batch(rows, {"penultimate": X[rows]})
        parts_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        writer.finalize({})
        assemble_s = time.perf_counter() - t0
    return {"parts_s": parts_s, "assemble_s": assemble_s, "bytes": path.stat().st_size}


def h5_layout(X: np.ndarray, dtype: str, chunk_rows: int, compression: str, work: Path) -> dict:
    import h5py

    n, dims = X.shape
    storage = np.float16 if dtype == "float16" else np.float32
    kwargs = {}
    if compression.startswith("gzip"):
        kwargs = {"compression": "gzip", "compression_opts": int(compression[4:])}
    elif compression == "lzf":
        kwargs = {"compression": "lzf"}
    path = work / "layout.h5"
    rows_per_chunk = min(chunk_rows, n)
    t0 = time.perf_counter()
    # Whole chunks per write: batches of 64 written one by one into a compressed chunk bigger than HDF5's
    # chunk cache (1 MiB) recompress the whole chunk every time, which is what featx's assembly avoids.
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", shape=(n, dims), dtype=storage, chunks=(rows_per_chunk, dims), **kwargs)
        for start in range(0, n, rows_per_chunk):
            ds[start : start + rows_per_chunk] = X[start : start + rows_per_chunk].astype(storage)
    write_s = time.perf_counter() - t0
    os.sync()
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        f["x"][:]
    read_s = time.perf_counter() - t0
    rows = np.sort(np.random.default_rng(0).choice(n, size=min(1000, n), replace=False))
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        f["x"][rows]
    scattered_s = time.perf_counter() - t0
    return {"write_s": write_s, "read_s": read_s, "scattered_s": scattered_s, "bytes": path.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dims", type=int, default=1280)
    parser.add_argument("--features", help="a featx store whose features to write (tiled to --n)")
    parser.add_argument(
        "--extract-ips",
        type=float,
        nargs="+",
        default=[60.0, 10_000.0],
        help="extraction rates (images/s) to express the store's cost against",
    )
    parser.add_argument("--quick", action="store_true", help="20,000 rows, fewer layouts")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "featx-bench"))
    args = parser.parse_args()
    n = 20_000 if args.quick else args.n
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    X = features(n, args.dims, args.features)
    mb = X.nbytes / 2**20
    print(f"machine: {machine_line()}\n")
    print(f"### featx's store writer: {n} × {X.shape[1]} features in batches of {BATCH}\n")
    rows = []
    for dtype in ("float32", "float16"):
        r = featx_writer(X, dtype, work)
        per_image = (r["parts_s"] + r["assemble_s"]) / n
        shares = ", ".join(f"{100 * per_image * ips:.2f} % at {ips:g} img/s" for ips in args.extract_ips)
        rows.append(
            [
                dtype,
                f"{r['parts_s']:.2f}",
                f"{r['assemble_s']:.2f}",
                f"{n / (r['parts_s'] + r['assemble_s']):,.0f}",
                f"{r['bytes'] / 2**20:.0f}",
                shares,
            ]
        )
    print(
        table(
            [
                "dtype",
                "batch parts s",
                "assembly s",
                "rows/s overall",
                "file MiB",
                "share of extraction time (writer thread, overlapped)",
            ],
            rows,
        )
        + "\n"
    )

    print(f"### plain h5py layouts ({mb:.0f} MiB of float32 features)\n")
    chunks = (64, 1024, 8192) if not args.quick else (204, 8192)
    compressions = ("none", "lzf", "gzip1", "gzip4") if not args.quick else ("none", "lzf", "gzip1")
    rows = []
    for dtype in ("float32", "float16"):
        for chunk in chunks:
            for comp in compressions:
                r = h5_layout(X, dtype, chunk, comp, work)
                rows.append(
                    [
                        dtype,
                        chunk,
                        comp,
                        f"{mb / r['write_s']:.0f}",
                        f"{mb / r['read_s']:.0f}",
                        f"{1000 * r['scattered_s']:.0f}",
                        f"{r['bytes'] / 2**20:.0f}",
                    ]
                )
                print(f"  {dtype} {chunk} {comp}", file=sys.stderr, flush=True)
    print(
        table(
            [
                "dtype",
                "chunk rows",
                "compression",
                "write MiB/s (of float32)",
                "read all MiB/s",
                "1,000 scattered rows ms",
                "file MiB",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
