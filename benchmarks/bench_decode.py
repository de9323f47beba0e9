"""Decoding cost per photo: ``--decode exact`` against ``--decode fast``, by photo size.

Usage::

    python benchmarks/bench_decode.py [--sizes 0.2 1 3 12] [--repeats 30]

One real photo (hymenoptera's, or ``--photo FILE``) is resized to each size in megapixels (4:3) and saved as
a quality-90 JPEG, so the files are what a camera or phone writes at that size. Each is then decoded and
preprocessed to Lite0's 224×224 input with featx's own ``load_for_model``, single-threaded, ``--repeats``
times. Prints milliseconds per photo for both modes and how far the fast pixels are from the exact ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HYMENOPTERA, REPO, machine_line, table


def make_photo(source: Path, megapixels: float, out: Path) -> Path:
    from PIL import Image

    w = round((megapixels * 1e6 * 4 / 3) ** 0.5)
    h = round(w * 3 / 4)
    with Image.open(source) as img:
        img.convert("RGB").resize((w, h), Image.Resampling.LANCZOS).save(out, quality=90)
    return out


def per_photo_ms(path: Path, pre, decode: str, repeats: int) -> float:
    from featx.data.imageio import load_for_model

    load_for_model(path, pre, 10**9, decode)  # page cache and first-call costs out of the timing
    t0 = time.perf_counter()
    for _ in range(repeats):
        load_for_model(path, pre, 10**9, decode)
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.2, 1.0, 3.0, 12.0], help="megapixels")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--photo", help="the photo to scale [default: the first hymenoptera JPEG]")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "featx-bench"))
    parser.add_argument("--quick", action="store_true", help="10 repeats")
    args = parser.parse_args()
    repeats = 10 if args.quick else args.repeats

    import torch
    from PIL import Image

    from featx.backbones import load_backbone
    from featx.data.imageio import load_for_model

    torch.set_num_threads(1)
    source = Path(args.photo) if args.photo else next(iter(sorted(HYMENOPTERA.rglob("*.jpg"))), None)
    if source is None:
        sys.exit(f"no photo: pass --photo FILE ({HYMENOPTERA} is missing)")
    pre = load_backbone("featx:efficientnet_lite0").preprocessing
    work = Path(args.workdir) / "decode"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for mp in args.sizes:
        path = make_photo(source, mp, work / f"photo-{mp:g}mp.jpg")
        exact = per_photo_ms(path, pre, "exact", repeats)
        fast = per_photo_ms(path, pre, "fast", repeats)
        diff = (load_for_model(path, pre, 10**9, "fast").int() - load_for_model(path, pre, 10**9, "exact").int()).abs()
        with Image.open(path) as img:
            size = f"{img.width}×{img.height}"
        rows.append(
            [
                f"{mp:g} MP ({size})",
                f"{exact:.1f}",
                f"{fast:.1f}",
                f"{exact / fast:.1f}×",
                f"{diff.float().mean():.2f} / {int(diff.max())}",
            ]
        )
        print(f"  {mp:g} MP: exact {exact:.1f} ms, fast {fast:.1f} ms", file=sys.stderr, flush=True)
    print(f"machine: {machine_line()}\n")
    crop = f"{pre.input_size[0]}×{pre.input_size[1]}"
    print(f"### decoding + preprocessing to {crop} ({pre.interpolation}), one thread\n")
    header = ["photo", "exact ms", "fast ms", "speed-up", "pixel diff mean / max (levels)"]
    print(table(header, rows) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
