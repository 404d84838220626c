"""Image sources decoded once into uint8 tensors: image folders, torchvision sets, the sample.

Every source yields an :class:`ImageSet`: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,)
(-1 everywhere for unlabeled images) and the class names. A folder is scanned once
(:func:`scan_folder`), its labels resolved from the layout (:func:`resolve_labels`), and the
chosen files decoded once per job (:func:`decode_split`): the decoded set is cached to a file
keyed by the file list, sizes, modification times and the target size; one process builds it
while the others wait on a lock, and every process maps the same file into memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from selfsup import SelfsupError
from selfsup.data.decode import decode_files, is_image_name

SAMPLE_ZIP = Path(__file__).parent / "sample" / "cifar10_sample.zip"
EVAL_SPLITS = ("val", "test")
#: Bumped whenever decoding changes, so that old caches are not read.
CACHE_VERSION = "2"

Labels = Literal["auto", "folders", "none"]


@dataclass
class ImageSet:
    """Decoded images of one split. images: uint8 (N, 3, H, W), or a streamed split's
    ``LazyImages`` that decode when read; labels: int64 (N,), -1 when the images have no
    labels; classes: the class names (empty without labels)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def labelled(self) -> bool:
        return len(self.classes) > 0

    def subset(self, idx: torch.Tensor) -> ImageSet:
        # Streamed images (selfsup.data.streaming.LazyImages) stay undecoded.
        images = self.images.subset(idx) if hasattr(self.images, "subset") else self.images[idx]
        return ImageSet(images, self.labels[idx], self.classes)


def default_cache_dir() -> Path:
    base = os.environ.get("SELFSUP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "selfsup"
    )
    return Path(base)


# -- finding files and labels -------------------------------------------------------------
@dataclass
class FolderScan:
    """The image files under one directory, in a fixed order.

    files: paths; relative: the same paths relative to ``directory`` (as strings, '/'-joined);
    ignored: how many other (non-image) files were seen.
    """

    directory: Path
    files: list[Path]
    relative: list[str]
    ignored: int = 0


def scan_folder(directory: Path) -> FolderScan:
    """Every image file at any depth below ``directory``: links followed (each real directory
    once, so link loops end), hidden files and folders skipped, extensions Pillow decodes;
    sorted by relative path, so the order is the same on every machine and run."""
    directory = Path(directory)
    seen: set[str] = set()
    found: list[str] = []
    ignored = 0
    for root, dirs, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back into a directory already walked
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_root = os.path.relpath(root, directory)
        for n in names:
            if is_image_name(n):
                found.append(n if rel_root == "." else f"{rel_root}/{n}".replace(os.sep, "/"))
            elif not n.startswith("."):
                ignored += 1
    found.sort()
    return FolderScan(directory, [directory / r for r in found], found, ignored)


def folder_splits(root: Path) -> tuple[Path, Path | None]:
    """The training folder and the evaluation split's folder (None when there is none): split
    folders count only beside a ``train/`` folder (in a plain folder of photos a subfolder
    called ``test`` is just more photos)."""
    train_dir = root / "train" if (root / "train").is_dir() else root
    eval_dir = next((root / s for s in EVAL_SPLITS if (root / s).is_dir()), None) if train_dir != root else None
    return train_dir, eval_dir


@dataclass
class LabelChoice:
    """Labels of a scanned split: one int per file (-1: unlabeled), the class names, and which
    layout was chosen (``folders`` or ``none``) with the reason, for the one line that says so."""

    labels: list[int]
    classes: list[str]
    mode: Literal["folders", "none"]
    reason: str


def resolve_labels(scan: FolderScan, labels: Labels, classes: list[str] | None = None) -> LabelChoice:
    """Labels from the layout ``DIR/<class>/<any depth>/<image>``.

    ``folders``: every image must sit in a class folder (at any depth below it); a folder holding
    no image is never a class. ``none``: no labels. ``auto``: class folders when every image
    sits directly in one and there are at least two, else none: a folder of photos sorted into
    year/event subfolders is not taken for a labelled set. ``classes`` forces the label order of another split.
    """
    tops = [r.split("/", 1)[0] if "/" in r else None for r in scan.relative]
    loose = [r for r, t in zip(scan.relative, tops, strict=True) if t is None]
    found = sorted({t for t in tops if t is not None})

    def unlabeled(reason: str) -> LabelChoice:
        return LabelChoice([-1] * len(tops), [], "none", reason)

    if labels == "none":
        return unlabeled("data.labels=none")
    if labels == "auto":
        if loose:
            return unlabeled(f"{len(loose):,} images are not in a class folder")
        if len(found) < 2:
            return unlabeled(f"{len(found)} folder holds images, not 2 or more classes")
        deep = sum(r.count("/") > 1 for r in scan.relative)
        if deep:  # an archive by year/trip/...: its folders are no classes (solo-learn #374)
            return unlabeled(f"{deep:,} images sit more than one folder deep; set data.labels folders "
                             "if the top-level folders are classes")
    elif loose:
        raise SelfsupError(
            f"data.labels=folders, but {len(loose)} images of {scan.directory} are not in a class folder "
            f"({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}); move them into "
            f"{scan.directory}/<class>/, or set data.labels none to pretrain without labels"
        )
    if classes is not None:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise SelfsupError(f"{scan.directory} has classes not in the training split: {', '.join(extra[:5])}")
        found = classes
    index = {c: i for i, c in enumerate(found)}
    return LabelChoice([index[t] for t in tops], found, "folders", f"{len(found)} class folders")


# -- decoding, cached once per job ----------------------------------------------------------
@dataclass
class SplitReport:
    """What decoding a split found: ``found`` files chosen, ``used`` images decoded,
    ``skipped`` (relative path, reason) of those that could not be, ``smaller`` images that
    were upscaled to the target size, and whether this process decoded them or read the cache
    (``seconds`` of decoding, None when read)."""

    directory: str
    found: int
    used: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    smaller: int = 0
    seconds: float | None = None
    workers: int = 1


def _file_key(f: Path) -> str:
    try:
        st = f.stat()
    except OSError:  # a broken link: part of the key as it is
        return f"{f}|missing"
    return f"{f}|{st.st_size}|{st.st_mtime_ns}"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` across processes (and nodes sharing the filesystem)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent builders only cost time
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        # mmap: every process of the job shares the file's pages instead of holding a copy.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a foreign or damaged file: rebuild it
        return None


def decode_split(
    scan: FolderScan,
    choice: LabelChoice,
    indices: Sequence[int] | None,
    image_size: int | None,
    cache_dir: Path | None,
    use_cache: bool,
    workers: int | None = None,
    desc: str = "decoding",
) -> tuple[ImageSet, SplitReport]:
    """Decode the files ``indices`` of ``scan`` (all when None) with their labels.

    With ``use_cache`` the result is stored in ``cache_dir`` under a key of the files, their
    sizes and modification times and the target size. The first process to need it builds it
    under a file lock, writes it atomically (a temporary file, then a rename) and the others
    wait, then read it: each image is decoded once per job, however many processes train.
    """
    idx = list(range(len(scan.files))) if indices is None else list(indices)
    files = [scan.files[i] for i in idx]
    rel = [scan.relative[i] for i in idx]
    labels = [choice.labels[i] for i in idx]

    def build() -> dict:
        t0 = time.perf_counter()
        bar = tqdm(total=len(files), desc=desc, unit="img", leave=False, mininterval=1.0)
        d = decode_files(files, image_size, workers, progress=bar.update)
        bar.close()
        if image_size is None:
            shapes = {a.shape for a in d.images}
            if len(shapes) > 1:
                raise SelfsupError(
                    f"{scan.directory}: images have different sizes ({', '.join(map(str, sorted(shapes)[:3]))}, ...); "
                    "set data.image_size"
                )
            images = (torch.from_numpy(np.stack(d.images)).permute(0, 3, 1, 2).contiguous() if d.images
                      else torch.zeros(0, 3, 1, 1, dtype=torch.uint8))
        else:
            images = torch.from_numpy(d.images)
        return {
            "images": images,
            "labels": torch.tensor(labels, dtype=torch.long)[torch.from_numpy(d.ok)],
            "classes": choice.classes,
            "skipped": [rel[i] for i, _ in d.reasons],
            "reasons": [r for _, r in d.reasons],
            "smaller": int(d.smaller),
            "seconds": time.perf_counter() - t0,
            "workers": d.workers,
        }

    payload: dict | None = None
    if use_cache and cache_dir is not None:
        key_parts = [CACHE_VERSION, str(scan.directory.resolve()), str(image_size), ",".join(choice.classes),
                     *map(_file_key, files), *map(str, labels)]
        key = hashlib.sha1("\n".join(key_parts).encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"{key}.pt"
        payload = _read_cache(path)
        if payload is None:
            with _exclusive(path.with_suffix(".lock")):
                payload = _read_cache(path)  # another process may have built it meanwhile
                if payload is None:
                    built = build()
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".tmp{os.getpid()}")
                    torch.save({k: v for k, v in built.items() if k not in ("seconds", "workers")}, tmp)
                    os.replace(tmp, path)  # atomic: no process ever reads a half-written cache
                    payload = _read_cache(path) or built  # mapped, so the pages are shared
                    payload["seconds"], payload["workers"] = built["seconds"], built["workers"]
    if payload is None:
        payload = build()
    report = SplitReport(str(scan.directory), len(files), len(payload["images"]),
                         list(zip(payload["skipped"], payload["reasons"], strict=True)), int(payload["smaller"]),
                         payload.get("seconds"), int(payload.get("workers", 1)))
    return ImageSet(payload["images"], payload["labels"], list(payload["classes"])), report


#: Classes of the torchvision sets ``ImageDataModule`` reads, known without reading them.
TORCHVISION_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10}


def _sample_names(zf: zipfile.ZipFile, split: str) -> tuple[list[str], list[str]]:
    names = sorted(n for n in zf.namelist() if n.startswith(f"{split}/") and is_image_name(n.rsplit("/", 1)[-1]))
    return names, sorted({n.split("/")[1] for n in names})


def sample_classes() -> list[str]:
    """Class names of the embedded sample, from its file list (nothing decoded)."""
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        return _sample_names(zf, "train")[1]


def load_sample_split(split: str, image_size: int | None) -> ImageSet:
    """Decode one split (``train`` or ``val``) of the embedded CIFAR-10 sample."""
    with zipfile.ZipFile(SAMPLE_ZIP) as zf:
        names, classes = _sample_names(zf, split)
        blobs = [zf.read(n) for n in names]
    labels = torch.tensor([classes.index(n.split("/")[1]) for n in names], dtype=torch.long)
    d = decode_files(blobs, image_size if image_size is not None else 32, workers=1)
    return ImageSet(torch.from_numpy(d.images), labels, classes)


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
