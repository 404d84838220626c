"""Image sources decoded once into uint8 tensors: image folders, torchvision sets, the sample.

Every source yields an :class:`ImageSet`: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,)
and the class names. Decoding happens once; large sets are cached to a file keyed by the
file list, sizes, modification times and the target size, so later runs skip the JPEG decode.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from selfsup import SelfsupError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SAMPLE_ZIP = Path(__file__).parent / "sample" / "cifar10_sample.zip"
EVAL_SPLITS = ("val", "test")


@dataclass
class ImageSet:
    """Decoded images of one split. images: uint8 (N, 3, H, W); labels: int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[idx], self.labels[idx], self.classes)


def default_cache_dir() -> Path:
    base = os.environ.get("SELFSUP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "selfsup"
    )
    return Path(base)


def decode_image(data: bytes | str | Path, image_size: int | None) -> np.ndarray:
    """Decode one image to RGB uint8 (H, W, 3); with ``image_size``, resize the shorter side
    to it (antialiased) and centre-crop a square. Grayscale, palette and RGBA become RGB."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im = im.convert("RGB")
        if image_size is not None and im.size != (image_size, image_size):
            w, h = im.size
            s = image_size / min(w, h)
            nw, nh = max(image_size, round(w * s)), max(image_size, round(h * s))
            im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        return np.asarray(im, dtype=np.uint8)


def decode_many(
    items: Sequence[bytes | Path], image_size: int | None, desc: str, workers: int | None = None
) -> torch.Tensor:
    """Decode images in a thread pool (Pillow releases the GIL while decoding) with a
    progress bar. Returns uint8 (N, 3, H, W)."""
    if not items:
        raise SelfsupError(f"{desc}: no images to decode")
    workers = workers or min(8, os.cpu_count() or 1)
    arrays: list[np.ndarray] = []
    with ThreadPoolExecutor(workers) as pool:
        it = pool.map(lambda x: decode_image(x, image_size), items, chunksize=64)
        for arr in tqdm(it, total=len(items), desc=desc, unit="img", leave=False, mininterval=1.0):
            arrays.append(arr)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise SelfsupError(
            f"{desc}: images have different sizes ({', '.join(map(str, sorted(shapes)[:3]))}, ...); set data.image_size"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _class_files(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of an ImageFolder split: <split_dir>/<class>/<image>, classes sorted."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for i, c in enumerate(classes):
        for root, _, names in os.walk(split_dir / c, followlinks=True):
            for n in sorted(names):
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(Path(root) / n)
                    labels.append(i)
    return files, labels, classes


def _cached(
    key_parts: Sequence[str], cache_dir: Path | None, n: int, min_images: int, build: Callable[[], ImageSet]
) -> ImageSet:
    """Load an ImageSet from the cache file named by ``key_parts``, or build and store it."""
    if cache_dir is None or n < min_images:
        return build()
    key = hashlib.sha1("\n".join(key_parts).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            return ImageSet(d["images"], d["labels"], list(d["classes"]))
        except Exception:  # a truncated or foreign file: rebuild it
            pass
    s = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"images": s.images, "labels": s.labels, "classes": s.classes}, tmp)
    os.replace(tmp, path)  # atomic: concurrent DDP ranks never read a half-written cache
    return s


def load_folder_split(
    split_dir: Path,
    image_size: int | None,
    select: Callable[[int], torch.Tensor | None] | None = None,
    classes: list[str] | None = None,
    cache_dir: Path | None = None,
    cache_min_images: int = 5000,
) -> ImageSet:
    """Decode an ImageFolder split. ``select(n)`` may return indices of the files to keep
    (a seeded subset), chosen before decoding. ``classes`` forces the label order of another split."""
    files, labels, found = _class_files(split_dir)
    if classes is not None and found != classes:
        missing = sorted(set(found) - set(classes))
        if missing:
            raise SelfsupError(f"{split_dir} has classes not in the training split: {', '.join(missing[:5])}")
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[found[lab]] for lab in labels]
        found = classes
    if not files:
        raise SelfsupError(
            f"no images found in {split_dir}: expected {split_dir}/<class>/<image> "
            f"with extensions {', '.join(IMAGE_EXTENSIONS[:5])}, ..."
        )
    idx = select(len(files)) if select is not None else None
    if idx is not None:
        files = [files[i] for i in idx.tolist()]
        labels = [labels[i] for i in idx.tolist()]
    stats = [f"{f}|{st.st_size}|{st.st_mtime_ns}" for f in files for st in (f.stat(),)]
    key = [str(split_dir.resolve()), str(image_size), *stats]

    def build() -> ImageSet:
        images = decode_many(files, image_size, desc=f"decoding {split_dir.name}")
        return ImageSet(images, torch.tensor(labels, dtype=torch.long), found)

    return _cached(key, cache_dir, len(files), cache_min_images, build)


def load_sample_split(split: str, image_size: int | None) -> ImageSet:
    """Decode one split (``train`` or ``val``) of the embedded CIFAR-10 sample."""
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(f"{split}/") and n.lower().endswith(IMAGE_EXTENSIONS))
        classes = sorted({n.split("/")[1] for n in names})
        blobs = [zf.read(n) for n in names]
    labels = torch.tensor([classes.index(n.split("/")[1]) for n in names], dtype=torch.long)
    return ImageSet(decode_many(blobs, image_size, desc=f"decoding sample/{split}"), labels, classes)


def load_torchvision_split(name: str, root: str, train: bool, download: bool, image_size: int | None) -> ImageSet:
    """CIFAR-10, CIFAR-100 or STL-10 (train/test) from torchvision's files under ``root``."""
    import torchvision.datasets as tvd

    try:
        if name == "cifar10":
            ds = tvd.CIFAR10(root, train=train, download=download)
        elif name == "cifar100":
            ds = tvd.CIFAR100(root, train=train, download=download)
        elif name == "stl10":
            ds = tvd.STL10(root, split="train" if train else "test", download=download)
        else:
            raise SelfsupError(f"unknown torchvision dataset {name!r}")
    except RuntimeError as e:
        raise SelfsupError(
            f"{name} files not found under {root} ({e}); put torchvision's {name} files there, "
            "or set data.download=true on a machine with internet"
        ) from None
    if name == "stl10":
        images = torch.from_numpy(np.asarray(ds.data))  # (N, 3, 96, 96)
        labels = torch.as_tensor(np.asarray(ds.labels), dtype=torch.long)
    else:
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) on disk
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
    if image_size is not None and images.shape[-1] != image_size:
        images = torch.nn.functional.interpolate(
            images.float(), size=(image_size, image_size), mode="bilinear", antialias=True
        ).round_().clamp_(0, 255).to(torch.uint8)
    return ImageSet(images, labels, list(ds.classes))
