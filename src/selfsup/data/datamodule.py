"""The DataModule: decoded uint8 tensors in memory, fixed seeded splits, shuffled batches.

Batches are dicts: ``image`` uint8 (B, 3, H, W), ``label`` int64 (B,) (-1 for unlabeled
images), ``index`` int64 (B,) (the row of the image in its split, used e.g. to cache frozen
features). Augmentation and normalization happen later, on the training device (see
``selfsup.data.views``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from selfsup import SelfsupError
from selfsup.config import COUNT, NON_NEGATIVE, SHARE, Range, check_ranges
from selfsup.console import say
from selfsup.data.cache import SplitReport, decode_split, default_cache_dir
from selfsup.data.folders import (
    FolderScan,
    LabelChoice,
    Labels,
    check_image_root,
    folder_splits,
    resolve_labels,
    scan_folder,
)
from selfsup.data.litdata.format import join_uri, read_stream_labels, read_stream_meta
from selfsup.data.litdata.samples import (
    CenterImage,
    CropViews,
    RandomSquare,
    Undecoded,
    collate_undecoded,
    decode_batch_on_device,
)
from selfsup.data.loaders import ResumableLoader, ResumableSampler, TensorImageDataset, collate
from selfsup.data.report import BAD_FILES_NAME, write_bad_files
from selfsup.data.sources import (
    TORCHVISION_CLASSES,
    load_sample_split,
    load_torchvision_split,
    sample_classes,
)
from selfsup.data.splits import ImageSet, held_out_split, label_fraction_subset, seeded_subset
from selfsup.protocols import LazyRows, SampleFn, StreamsSamples

Source = Literal["auto", "folder", "stream", "sample", "cifar10", "cifar100", "stl10"]
BadFiles = Literal["skip", "stop"]
DecodeOn = Literal["workers", "device"]


def _as_list(idx: torch.Tensor | None) -> list[int] | None:
    return None if idx is None else idx.tolist()


class ImageDataHparams(Protocol):
    """:class:`ImageDataModule`'s hyperparameters as ``save_hyperparameters`` stores them (its
    constructor's arguments), read through :attr:`ImageDataModule.hp`."""

    root: str | None
    source: Source
    labels: Labels
    eval_root: str | None
    bad_files: BadFiles
    image_size: int | None
    batch_size: int
    eval_batch_size: int | None
    num_workers: int
    val_fraction: float
    max_train_images: int | None
    max_eval_images: int | None
    seed: int
    download: bool
    cache_dir: str | None
    cache_min_images: int
    decode_workers: int | None
    drop_last: bool
    decode_on: DecodeOn


class ImageDataModule(L.LightningDataModule):
    """Images for every stage, from an image folder, a torchvision set or the embedded sample.

    Args:
        root: a folder of images, at any depth, with or without class folders
            (``ROOT/<image>``, ``ROOT/<class>/<image>``), optionally split as ``ROOT/train/...``
            and ``ROOT/val/...`` or ``ROOT/test/...``; or torchvision's files for
            cifar10/cifar100/stl10; or, with ``source: stream``, what ``selfsup data optimize``
            wrote (a local folder or a URI LitData reads: s3://, gs://, ...).
        source: ``auto`` reads ``root`` as an image folder, or the embedded sample when
            ``root`` is unset. ``stream``: nothing is decoded ahead; images are decoded in the
            loader's workers as they are read (collections larger than memory).
        labels: ``folders`` (the first folder level below the split is the class), ``none``
            (unlabeled), or ``auto``: class folders when every image sits in one and there are
            two or more, else unlabeled. The choice is printed.
        eval_root: labeled images (``EVAL/<class>/<image>``, or with ``train/`` and
            ``val/``/``test/`` splits) for evaluation: the online monitor of the pretraining
            stages and the probes of ``selfsup pipeline``. None: evaluate on ``root``'s labels.
        bad_files: what to do with files that cannot be decoded: ``skip`` them (named on one
            line and listed in ``bad_files.txt``) or ``stop`` before training.
        image_size: decode images to this square side (shorter side resized, center crop);
            None keeps the native size (all images must then share it).
        batch_size: images per device per step (the global batch is this times devices).
        val_fraction: share of train held out for evaluation when there is no val/test split.
        max_train_images / max_eval_images: seeded subsets, picked before decoding.
        seed: seeds the held-out split and subsets; fixed so that every stage sees one split.
        download: let torchvision download its datasets (off: nothing is fetched at run time).
        cache_dir: where decoded sets of at least ``cache_min_images`` images (any size under
            DDP, so that one process decodes for all) are cached; None uses ``$SELFSUP_CACHE``
            or ``~/.cache/selfsup``.
        decode_workers: processes decoding images; None: every available core.
        drop_last: drop the last incomplete training batch (keeps per-rank batches equal).
        decode_on: with ``source: stream``, where training images are decoded: in the loader's
            ``workers`` (Pillow, reduced-size JPEG decoding where the crops allow), or on the
            training ``device`` (torchvision's batched ``decode_jpeg``: nvJPEG on a GPU; the
            workers then only read and draw the crop boxes).
    """

    def __init__(
        self,
        root: str | None = None,
        source: Source = "auto",
        labels: Labels = "auto",
        eval_root: str | None = None,
        bad_files: BadFiles = "skip",
        image_size: int | None = None,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.2,
        max_train_images: int | None = None,
        max_eval_images: int | None = None,
        seed: int = 0,
        download: bool = False,
        cache_dir: str | None = None,
        cache_min_images: int = 5000,
        decode_workers: int | None = None,
        drop_last: bool = True,
        decode_on: DecodeOn = "workers",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_ranges(
            "data",
            {
                "image_size": (image_size, Range(8)),
                "batch_size": (batch_size, COUNT),
                "eval_batch_size": (eval_batch_size, COUNT),
                "num_workers": (num_workers, NON_NEGATIVE),
                "val_fraction": (val_fraction, SHARE),
                "max_train_images": (max_train_images, COUNT),
                "max_eval_images": (max_eval_images, COUNT),
                "seed": (seed, NON_NEGATIVE),
                "cache_min_images": (cache_min_images, NON_NEGATIVE),
                "decode_workers": (decode_workers, COUNT),
            },
        )
        self.train_set: ImageSet | None = None
        self.eval_set: ImageSet | None = None
        self.eval_split = ""
        self.reports: list[SplitReport] = []
        #: where ``bad_files.txt`` goes (the run folder); set by the CLI and the pipeline.
        self.run_dir: str | None = None
        self.defer_bad_files = False
        self._evaluation: ImageDataModule | None = None
        self._layout: tuple[Path, Path | None, FolderScan, LabelChoice] | None = None
        self._device_sample: Any = None  # what decode_on=device makes of a streamed batch
        self._meta: dict[str, Any] | None = None  # a streamed dataset's selfsup.json, read once
        if decode_on == "device" and self.source != "stream":
            raise SelfsupError("data.decode_on=device needs data.source=stream (encoded images to decode)")
        if self.source == "folder":
            check_image_root(root)
        elif self.source == "stream":
            if image_size is None:
                raise SelfsupError("data.source=stream needs data.image_size (the side images are decoded to)")
            self._stream_meta()
        if eval_root is not None:
            check_image_root(eval_root, "data.eval_root")

    @property
    def hp(self) -> ImageDataHparams:
        """The hyperparameters, typed (Lightning types ``hparams`` as a plain mapping)."""
        return cast(ImageDataHparams, self.hparams)

    @property
    def source(self) -> str:
        s = self.hp.source
        if s == "auto":
            return "sample" if self.hp.root is None else "folder"
        return s

    def setup(self, stage: str | None = None) -> None:
        """Load (decode once, or read the job's cache) the training and evaluation splits, and
        the separate evaluation data; say what was found; apply the bad-file policy."""
        if self.train_set is not None:
            return
        self._load()
        if self.hp.eval_root is not None:
            hp = {k: v for k, v in self.hparams.items() if not k.startswith("_")}  # not the CLI's _instantiator
            hp.update(root=self.hp.eval_root, source="folder", labels="folders", eval_root=None, decode_on="workers")
            ev = ImageDataModule(**hp)
            ev.trainer = self.trainer
            ev._load()
            if (ev.num_classes or 0) < 2:
                raise SelfsupError(
                    f"data.eval_root {ev.hp.root} has {ev.num_classes} class folder; "
                    "evaluation needs 2 or more (EVAL/<class>/<image>)"
                )
            self._evaluation = ev
        self._report()

    # -- loading ---------------------------------------------------------------------------
    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size)
        return int(os.environ.get("WORLD_SIZE", "1"))

    def _load(self) -> None:
        hp = self.hp
        src = self.source
        if src == "sample":
            self.train_set = load_sample_split("train", hp.image_size)
            self.eval_set = load_sample_split("val", hp.image_size)
            self.eval_split = "val"
        elif src == "folder":
            self._load_folder()
            return
        elif src == "stream":
            self._load_stream()
        else:
            if hp.root is None:
                raise SelfsupError(f"data.source={src} needs data.root (the folder with torchvision's files)")
            self.train_set = load_torchvision_split(src, hp.root, True, hp.download, hp.image_size)
            self.eval_set = load_torchvision_split(src, hp.root, False, hp.download, hp.image_size)
            self.eval_split = "test"
        if hp.labels == "none":
            assert self.train_set is not None and self.eval_set is not None  # every source above loads both
            self.train_set = ImageSet(self.train_set.images, torch.full_like(self.train_set.labels, -1), [])
            self.eval_set = ImageSet(self.eval_set.images, torch.full_like(self.eval_set.labels, -1), [])
        for name, k in (("train_set", hp.max_train_images), ("eval_set", hp.max_eval_images)):
            idx = seeded_subset(len(getattr(self, name)), k, hp.seed)
            if idx is not None:
                setattr(self, name, getattr(self, name).subset(idx))

    def _stream_meta(self) -> dict[str, Any]:
        """``ROOT/selfsup.json`` of a streamed dataset (a download when ROOT is a bucket): read
        once, at construction, and kept."""
        if self._meta is None:
            self._meta = read_stream_meta(self.hp.root)
        return self._meta

    def _load_stream(self) -> None:
        """A dataset of ``selfsup data optimize``: its training and evaluation splits as
        :class:`~selfsup.data.litdata.dataset.LazyImages` (nothing decoded) with their labels."""
        from selfsup.data.litdata.dataset import LazyImages  # optional extra: litdata

        hp = self.hp
        meta = self._stream_meta()
        # The constructor stopped a stream without either (read_stream_meta's root, the image_size check).
        root, size = hp.root, hp.image_size
        assert root is not None and size is not None
        evals = [k for k in meta["splits"] if k != "train"]
        if not evals:
            raise SelfsupError(
                f"{hp.root} has no evaluation split; write one with selfsup data optimize "
                "--val-fraction 0.1 (or give the folder a val/ or test/ split)"
            )
        classes = meta["classes"] if meta["labels"] == "folders" else []

        def split(name: str) -> ImageSet:
            n = meta["splits"][name]["written"]
            labels = (
                torch.as_tensor(read_stream_labels(root, name), dtype=torch.long) if classes else torch.full((n,), -1)
            )
            images = LazyImages(join_uri(root, name), size, workers=hp.num_workers, length=n)
            # LazyImages is indexed like the uint8 tensor an ImageSet holds (see ImageSet).
            return ImageSet(cast(torch.Tensor, images), labels, classes)

        self.train_set, self.eval_set, self.eval_split = split("train"), split(evals[0]), evals[0]
        say(
            f"data: streaming {hp.root}: {len(self.train_set):,} train / {len(self.eval_set):,} {evals[0]} images, "
            + (f"{len(classes)} classes" if classes else "unlabeled")
            + f", decoded to {hp.image_size} px as they are read"
        )

    def _folder_layout(self) -> tuple[Path, Path | None, FolderScan, LabelChoice]:
        """The training folder, the evaluation split's folder (or None), the training files and
        their labels: scanned once (a listing, nothing decoded) and kept."""
        if self._layout is not None:
            return self._layout
        hp = self.hp
        if hp.root is None:
            raise SelfsupError("data.source=folder needs data.root")
        root = Path(hp.root).expanduser()
        if not root.is_dir():
            raise SelfsupError(f"data root not found: {root}")
        train_dir, eval_dir = folder_splits(root)
        scan = scan_folder(train_dir)
        if not scan.files:
            raise SelfsupError(f"no images found under {train_dir}")
        self._layout = (train_dir, eval_dir, scan, resolve_labels(scan, hp.labels))
        return self._layout

    def _load_folder(self) -> None:
        hp = self.hp
        train_dir, eval_dir, scan, choice = self._folder_layout()
        kind = (
            f"labeled by {choice.reason}"
            + (" (set data.labels none if they are not classes)" if hp.labels == "auto" else "")
            if choice.mode == "folders"
            else f"unlabeled ({choice.reason})"
        )
        say(f"data: {train_dir}: {len(scan.files):,} images, {kind}; data.labels={hp.labels}")
        cache = Path(hp.cache_dir) if hp.cache_dir else default_cache_dir()
        world = self._world_size()

        def load(sc, ch, indices, name: str) -> ImageSet:
            n = len(sc.files) if indices is None else len(indices)
            images, report = decode_split(
                sc,
                ch,
                indices,
                hp.image_size,
                cache,
                use_cache=n >= hp.cache_min_images or world > 1,
                workers=hp.decode_workers,
                desc=f"decoding {name}",
            )
            self.reports.append(report)
            # This process decoded: say so, on every rank of a fit whose processes share the work (a
            # pipeline's other processes decode their own copy before their trainers exist: silently).
            if report.seconds is not None:
                say(
                    f"data: decoded {report.found:,} images of {name} in {report.seconds:.1f} s "
                    f"({report.workers} process{'es' if report.workers > 1 else ''}, "
                    f"{report.found / max(report.seconds, 1e-9):,.0f} images/s)",
                    every_rank=world > 1 and getattr(self, "trainer", None) is not None,
                )
            return images

        if eval_dir is not None:
            eval_scan = scan_folder(eval_dir)
            if not eval_scan.files:
                raise SelfsupError(f"no images found under {eval_dir}")
            eval_choice = resolve_labels(
                eval_scan, choice.mode, classes=choice.classes if choice.mode == "folders" else None
            )
            self.train_set = load(
                scan, choice, _as_list(seeded_subset(len(scan.files), hp.max_train_images, hp.seed)), str(train_dir)
            )
            self.eval_set = load(
                eval_scan,
                eval_choice,
                _as_list(seeded_subset(len(eval_scan.files), hp.max_eval_images, hp.seed)),
                str(eval_dir),
            )
            self.eval_split = eval_dir.name
            return
        # No val/test folder: hold out a fixed, seeded share of the training files.
        n = len(scan.files)
        kept, held = held_out_split(n, hp.val_fraction, hp.seed)
        if len(kept) < 1:
            raise SelfsupError(
                f"{train_dir} holds {n} image(s): too few to hold out {hp.val_fraction:.0%} for evaluation"
            )

        def part(p: torch.Tensor, k: int | None) -> list[int]:
            return (p[:k] if k is not None else p).sort().values.tolist()

        self.train_set = load(scan, choice, part(kept, hp.max_train_images), f"{train_dir} (train part)")
        self.eval_set = load(scan, choice, part(held, hp.max_eval_images), f"{train_dir} (held out)")
        self.eval_split = f"{train_dir.name} (held out {hp.val_fraction:.0%})"

    def derived(self, label_fraction: float | None = None, batch_size: int | None = None) -> ImageDataModule:
        """The same decoded data (nothing read again) with only ``label_fraction`` of the training
        labels (:func:`label_fraction_subset`, seeded by ``data.seed``: the same images whoever
        asks) and, if given, another batch size; the evaluation split is unchanged."""
        train, evals = self._require()
        hp = {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        if batch_size is not None:
            hp["batch_size"] = batch_size
        dm = ImageDataModule(**hp)
        if label_fraction is not None:
            if not train.labeled:
                raise SelfsupError("label_fraction needs labeled training images")
            train = train.subset(label_fraction_subset(train.labels, label_fraction, self.hp.seed))
        dm.train_set, dm.eval_set, dm.eval_split, dm.reports = train, evals, self.eval_split, self.reports
        dm._layout = self._layout
        return dm

    # -- what was found ----------------------------------------------------------------------
    @property
    def all_reports(self) -> list[SplitReport]:
        """Reports of every decoded split, the separate evaluation data's included."""
        return self.reports + (self._evaluation.reports if self._evaluation is not None else [])

    @property
    def image_counts(self) -> dict[str, int]:
        """``used`` images (decoded) and ``skipped`` files (unreadable) over every split; for a
        streamed dataset, its images and the files ``selfsup data optimize`` skipped."""
        reports = self.all_reports
        used, skipped = sum(r.used for r in reports), sum(len(r.skipped) for r in reports)
        if self.source == "stream":
            train, evals = self._require()
            used += len(train) + len(evals)
            skipped += int(self._stream_meta().get("skipped", 0))
        return {"used": used, "skipped": skipped}

    def bad_files(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that could not be decoded."""
        return [(str(Path(r.directory) / p), why) for r in self.all_reports for p, why in r.skipped]

    def write_bad_files(self, folder: str | Path) -> Path | None:
        """Write the list of unreadable files (path, tab, reason; one a line) into ``folder``."""
        return write_bad_files(folder, self.bad_files())

    def _report(self) -> None:
        ev = self._evaluation
        if ev is not None:
            ev_train, ev_eval = ev.splits()
            say(
                f"data: evaluation data {ev.hp.root}: {len(ev_train):,} train / {len(ev_eval):,} "
                f"eval images ({ev.eval_split}), {ev.num_classes} classes"
            )
        smaller = sum(r.smaller for r in self.all_reports)
        if smaller:
            say(f"data: {smaller:,} images smaller than {self.hp.image_size} px were upscaled to it")
        bad = self.bad_files()
        if not bad:
            return
        total = sum(r.found for r in self.all_reports)
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        stop = self.hp.bad_files == "stop"
        listed = "full list: bad_files.txt in the run folder"
        if self.run_dir is not None:
            listed = f"full list: {Path(self.run_dir) / BAD_FILES_NAME}"
            # The CLI writes the list itself once the logger made the run folder (defer_bad_files).
            if getattr(rank_zero_only, "rank", 0) == 0 and (stop or not self.defer_bad_files):
                self.write_bad_files(self.run_dir)
        if stop:
            raise SelfsupError(
                f"{len(bad):,} of {total:,} image files cannot be decoded: {shown} ({listed}); "
                "fix or remove them, or set data.bad_files skip to train without them"
            )
        say(
            f"data: skipped {len(bad):,} of {total:,} image files that cannot be decoded "
            f"(data.bad_files=skip): {shown} ({listed})"
        )

    @property
    def has_labels(self) -> bool:
        """Whether the training images have labels."""
        return self._require()[0].labeled

    @property
    def evaluation_data(self) -> ImageDataModule | None:
        """The labeled data to evaluate on: the separate ``eval_root`` data, this module when
        its own images are labeled, or None (nothing to evaluate with)."""
        self._require()
        if self._evaluation is not None:
            return self._evaluation
        return self if self.has_labels else None

    # -- facts other stages read -------------------------------------------------------
    def _require(self) -> tuple[ImageSet, ImageSet]:
        if self.train_set is None or self.eval_set is None:
            self.setup()
        assert self.train_set is not None and self.eval_set is not None
        return self.train_set, self.eval_set

    def splits(self) -> tuple[ImageSet, ImageSet]:
        """The training and evaluation splits (:meth:`setup` loads them first if it has not)."""
        return self._require()

    @property
    def num_classes(self) -> int | None:
        """Classes of the training images' labels; None when they have none. Known without
        decoding (a folder is listed, once), so that ``selfsup fit`` can link it into the
        model's ``num_classes`` when both are built."""
        if self.train_set is not None:
            return len(self.train_set.classes) if self.train_set.labeled else None
        if self.hp.labels == "none":
            return None
        src = self.source
        if src == "folder":
            choice = self._folder_layout()[3]
            return len(choice.classes) if choice.mode == "folders" else None
        if src == "stream":
            meta = self._stream_meta()
            return len(meta["classes"]) if meta["labels"] == "folders" else None
        return len(sample_classes()) if src == "sample" else TORCHVISION_CLASSES[src]

    @property
    def classes(self) -> list[str]:
        return self._require()[0].classes

    @property
    def image_size(self) -> int:
        return int(self._require()[0].images.shape[-1])

    # -- loaders -------------------------------------------------------------------------
    def _loader(self, s: ImageSet, train: bool) -> DataLoader:
        hp = self.hp
        bs = hp.batch_size if train else (hp.eval_batch_size or hp.batch_size)
        if train and hp.drop_last and len(s) < bs:
            raise SelfsupError(f"batch_size {bs} is larger than the {len(s)} training images; lower data.batch_size")
        common: dict[str, Any] = {
            "batch_size": bs,
            "num_workers": hp.num_workers,
            "collate_fn": collate,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": hp.num_workers > 0,
        }
        if not train:  # in order; under DDP Lightning shards it with a DistributedSampler
            return DataLoader(TensorImageDataset(s), **common)
        if isinstance(s.images, LazyRows) and s.images.streams_whole_split:
            return self._stream_loader(s, bs)
        # Every image once per epoch, this rank's disjoint share, in an order that a restart in
        # the middle of the epoch continues (Lightning keeps a DistributedSampler as it is).
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        dataset = TensorImageDataset(s)
        return ResumableLoader(
            dataset,
            sampler=ResumableSampler(dataset, world, rank, seed=hp.seed),
            drop_last=hp.drop_last,
            trained_batches=self._trained_batches,
            **common,
        )

    def _stream_loader(self, s: ImageSet, batch_size: int) -> DataLoader:
        """LitData's loader over a whole streamed split: shuffled per epoch (chunks, then images
        within them), this rank's disjoint share, each image made in the workers as the stage
        asks (its ``stream_sample(image_size)``: e.g. SimCLR's crops cut from the full image),
        the trained position saved with each checkpoint."""
        from selfsup.data.litdata.dataset import (  # optional extra: litdata
            LazyImages,
            StreamedDataset,
            TrainedPositionLoader,
        )

        hp = self.hp
        module = self.trainer.lightning_module if self.trainer is not None else None
        sample: SampleFn = (
            module.stream_sample(hp.image_size) if isinstance(module, StreamsSamples) else CenterImage(hp.image_size)
        )
        extra: dict[str, Any] = {}
        if hp.decode_on == "device" and isinstance(sample, CenterImage | CropViews | RandomSquare):
            # The workers draw the boxes; on_before_batch_transfer decodes and cuts on the device.
            self._device_sample, sample = sample, Undecoded(sample)
            extra["collate_fn"] = collate_undecoded
        # Under DDP every rank needs as many batches: LitData gives the remainder to the last
        # rank unless it drops it.
        drop_last = hp.drop_last or self._world_size() > 1
        images = s.images
        assert isinstance(images, LazyImages)  # _loader streams only a LazyImages' whole split
        ds = StreamedDataset(images.directory, sample, shuffle=True, seed=hp.seed, drop_last=drop_last)
        return TrainedPositionLoader(
            ds,
            batch_size=batch_size,
            num_workers=hp.num_workers,
            drop_last=drop_last,
            pin_memory=torch.cuda.is_available(),
            trained_batches=self._trained_batches,
            fit_epoch=self._fit_epoch,
            **extra,
        )

    def _fit_epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``decode_on: device``: decode a streamed training batch on the training device."""
        if isinstance(batch, dict) and "jpeg" in batch:
            assert self.trainer is not None  # Lightning calls this hook from the trainer it attached
            return decode_batch_on_device(batch, self._device_sample, self.trainer.strategy.root_device)
        return batch

    def _trained_batches(self) -> int:
        """Batches of the current epoch the trainer has trained (see selfsup.data.loaders)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._require()[0], train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require()[1], train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require()[1], train=False)
