"""Image folders: the files under a directory, its train/val/test splits and the labels its layout gives.

A folder is scanned once (:func:`scan_folder`: a listing, nothing decoded) and its labels are
resolved from the layout (:func:`resolve_labels`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from selfsup import SelfsupError
from selfsup.data.decode import is_image_name

EVAL_SPLITS = ("val", "test")


Labels = Literal["auto", "folders", "none"]


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
    year/event subfolders is not taken for a labeled set. ``classes`` forces the label order of another split.
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
            return unlabeled(
                f"{deep:,} images sit more than one folder deep; set data.labels folders "
                "if the top-level folders are classes"
            )
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
    # Every top is a class folder here (loose images returned or raised above).
    index: dict[str | None, int] = {c: i for i, c in enumerate(found)}
    return LabelChoice([index[t] for t in tops], found, "folders", f"{len(found)} class folders")


def check_image_root(root: str | None, what: str = "data root") -> None:
    """Fail early, before any logger or process starts, on a missing or image-less root."""
    if root is None:
        raise SelfsupError("data.source=folder needs data.root")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise SelfsupError(f"{what} not found: {path}")
    for _, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(map(is_image_name, names)):
            return
    raise SelfsupError(
        f"no images found under {path} ({what}): expected image files (.jpg, .png, .webp or another format "
        f"Pillow reads) directly in it or at any depth below it, e.g. {path}/<image>, {path}/<class>/<image> "
        f"or {path}/train/<class>/<image>"
    )
