"""Build the embedded demo sample shipped inside the package.

Takes a fixed, seeded selection of CIFAR-10 JPEG files from an ImageFolder copy of
CIFAR-10 (``--src``: ``train/<class>/<file>.jpg``) and stores their bytes unchanged in one zip
file laid out as ``train/<class>/<file>`` and ``val/<class>/<file>``, the layout
that ``selfsup.data`` reads for any image folder.

    python scripts/make_sample.py --src /path/to/cifar10 --train-per-class 500 --val-per-class 100
"""

from __future__ import annotations

import argparse
import random
import zipfile
from pathlib import Path

DEST = Path(__file__).resolve().parents[1] / "src" / "selfsup" / "data" / "sample" / "cifar10_sample.zip"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, required=True, help="an ImageFolder copy of CIFAR-10")
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--val-per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dest", type=Path, default=DEST)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    # ZIP_STORED: JPEG bytes do not compress further; storing keeps reads cheap.
    with zipfile.ZipFile(args.dest, "w", compression=zipfile.ZIP_STORED) as zf:
        for split_in, split_out, per_class in (
            ("train", "train", args.train_per_class),
            ("test", "val", args.val_per_class),
        ):
            for class_dir in sorted(p for p in (args.src / split_in).iterdir() if p.is_dir()):
                files = sorted(class_dir.iterdir())
                for f in sorted(rng.sample(files, per_class)):
                    # A fixed timestamp keeps the archive byte-identical across rebuilds.
                    info = zipfile.ZipInfo(f"{split_out}/{class_dir.name}/{f.name}", (2020, 1, 1, 0, 0, 0))
                    zf.writestr(info, f.read_bytes())
                    n += 1
    print(f"wrote {n} images to {args.dest} ({args.dest.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
