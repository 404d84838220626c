"""Training on a LitData dataset that ``selfsup data optimize`` wrote (``data.source stream``).

Nothing is decoded ahead: every sample is decoded in the loader's workers from its encoded
bytes, as the stage asks (``selfsup.data.litdata.samples``). Memory therefore does not grow
with the collection.

- :class:`StreamedDataset`: LitData's ``StreamingDataset`` (per-epoch chunk-aware shuffle,
  disjoint shards across ranks, nodes and workers, local folders or s3:// / gs:// URIs) giving
  ``{<the sample function's keys>, "label", "index"}`` per image.
- :class:`TrainedPositionLoader`: LitData's ``StreamingDataLoader``, whose saved position is
  the number of batches *trained* (Lightning fetches ahead, so the loader's own count would skip
  batches after a restart; see ``selfsup.data.loaders``).
- :class:`LazyImages`: a split read by row like a uint8 (N, 3, S, S) tensor, decoded on access:
  the in-order passes (kNN banks, probe features, validation, figures) use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import litdata
import torch
from litdata.streaming.sampler import ChunkedIndex
from torch.utils.data import DataLoader, Dataset

from selfsup.data.litdata.samples import CenterImage
from selfsup.protocols import SampleFn


class StreamedDataset(litdata.StreamingDataset):
    """A split written by ``selfsup data optimize``, each sample made by ``sample_fn`` in the
    worker that reads it, with its ``index`` (row in the split) added.

    Args:
        directory: the split's folder, local or a URI LitData reads (s3://, gs://, ...).
        sample_fn: stored sample -> tensors (:class:`CenterImage`, :class:`CropViews`, ...).
        shuffle / seed: LitData's per-epoch shuffle (chunks, then samples within them),
            the same order on every rank for a given seed and epoch.
        drop_last: equal shares on every rank (DDP needs as many batches on each).
    """

    def __init__(
        self, directory: str, sample_fn: SampleFn, shuffle: bool = False, seed: int = 0, drop_last: bool | None = None
    ) -> None:
        # A full permutation within each chunk: LitData's default shuffles fixed blocks of 256
        # neighboring samples, so a batch would hold the same neighbors every epoch.
        super().__init__(
            directory, shuffle=shuffle, seed=seed, drop_last=drop_last, item_shuffle_window="full" if shuffle else None
        )
        self.sample_fn = sample_fn

    def __getitem__(self, index: Any) -> dict[str, Any]:
        sample = super().__getitem__(index)
        row = index.index if isinstance(index, ChunkedIndex) else int(index)
        return {**self.sample_fn(sample), "index": row}


class TrainedPositionLoader(litdata.StreamingDataLoader):
    """LitData's loader whose ``state_dict`` (saved by Lightning with each checkpoint) holds the
    batches the trainer *trained* this epoch rather than those handed out.

    Args:
        trained_batches: reads that count from the trainer; None: LitData's own count.
        fit_epoch: the trainer's current epoch; a saved position is resumed only in the epoch it
            was saved in (a run that ends epochs early, e.g. with ``limit_train_batches``,
            saves a position short of the end, and must start the next epoch afresh).
        Other arguments as ``StreamingDataLoader``'s.
    """

    def __init__(
        self,
        *args: Any,
        trained_batches: Callable[[], int] | None = None,
        fit_epoch: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.trained_batches, self.fit_epoch = trained_batches, fit_epoch
        self._resuming = False
        self._saved_fit_epoch: int | None = None

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._resuming, self._saved_fit_epoch = True, obj.get("fit_epoch")

    def __iter__(self) -> Any:
        # LitData leaves its resume flag set until a pass runs to its end, which Lightning does
        # not always ask for (it stops at len(loader)): the epoch after a resumed one would then
        # resume again and yield nothing. Only the first pass after load_state_dict resumes,
        # and only in the epoch the position was saved in.
        same_epoch = (
            self._saved_fit_epoch is None or self.fit_epoch is None or self.fit_epoch() == self._saved_fit_epoch
        )
        if not (self._resuming and same_epoch):
            self.restore = False
        self._resuming = False
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        if self.trained_batches is None:
            return super().state_dict()
        trained = self.trained_batches()
        n = trained * self.batch_size
        dataset = self.dataset.state_dict(n, self.num_workers, self.batch_size)
        # The epoch whose order the workers rebuild on resume: the loader's. The dataset's own
        # copy stays at the epoch it was restored in (set_epoch is ignored while a restored
        # state is pending), which would replay the wrong order after a second restart.
        dataset["current_epoch"] = self.current_epoch
        # Batches come from the workers in turn: the last trained one came from this worker.
        return {
            "dataset": dataset,
            "current_epoch": self.current_epoch,
            "num_samples_yielded": n,
            "latest_worker_idx": (trained - 1) % max(1, self.num_workers),
            "fit_epoch": self.fit_epoch() if self.fit_epoch is not None else None,
        }


class LazyImages:
    """The images of a streamed split, indexed like a uint8 (N, 3, S, S) tensor and decoded
    (center square of side ``size``) when read. ``subset`` and ``rows`` stay lazy; ``batches``
    decodes in order in ``workers`` processes.

    Args:
        directory: the split's folder or URI.
        size: side S of the decoded squares.
        rows: which stored rows, in order (None: all).
        workers: DataLoader workers for :meth:`batches`.
        length: the split's size (with ``rows`` None).
    """

    def __init__(
        self, directory: str, size: int, rows: torch.Tensor | None = None, workers: int = 0, length: int | None = None
    ) -> None:
        self.directory, self.size, self.workers = directory, size, workers
        self._rows = rows
        # A StreamingDataset's len is this rank's share under DDP: the split's size comes from
        # selfsup.json.
        self._n = len(rows) if rows is not None else length
        self._reader: tuple[int, StreamedDataset] | None = None

    def _dataset(self) -> StreamedDataset:
        # One reader per process: a forked worker must not reuse its parent's reader threads.
        if self._reader is None or self._reader[0] != os.getpid():
            self._reader = (os.getpid(), StreamedDataset(self.directory, CenterImage(self.size)))
        return self._reader[1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def __len__(self) -> int:
        if self._n is None:
            raise ValueError("LazyImages needs rows or the split's length")
        return self._n

    @property
    def streams_whole_split(self) -> bool:
        """All rows of the split, in stored order: training can stream it with LitData's
        shuffle; a subset (label fractions, max_train_images) is read by row instead."""
        return self._rows is None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self.size, self.size))

    def _stored(self, idx: torch.Tensor) -> list[int]:
        return (self._rows[idx] if self._rows is not None else idx).tolist()

    def __getitem__(self, idx: int | slice | torch.Tensor | list[int]) -> torch.Tensor:
        if isinstance(idx, int):
            return self[torch.tensor([idx])][0]
        if isinstance(idx, slice):
            idx = torch.arange(len(self))[idx]
        idx = _as_rows(idx)
        ds = self._dataset()
        rows = self._stored(idx.flatten())
        out = torch.empty(len(rows), 3, self.size, self.size, dtype=torch.uint8)
        for k, r in enumerate(rows):
            out[k] = ds[r]["image"]
        return out.view(*idx.shape, 3, self.size, self.size)

    def subset(self, idx: torch.Tensor) -> LazyImages:
        """The rows ``idx`` of these images, still not decoded."""
        idx = _as_rows(idx)
        return LazyImages(self.directory, self.size, torch.as_tensor(self._stored(idx)), self.workers)

    def rows(self, lo: int, hi: int) -> LazyImages:
        return self.subset(torch.arange(lo, hi))

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """The images in order, ``batch_size`` at a time (decoded in ``workers`` processes)."""
        # torch types collate_fn as taking a list of samples; _Rows.__getitems__ hands it one batch tensor.
        yield from DataLoader(
            _Rows(self),
            batch_size=batch_size,
            num_workers=self.workers,
            collate_fn=_as_is,  # type: ignore[arg-type]
        )


def _as_rows(idx: torch.Tensor | list[int]) -> torch.Tensor:
    """Row indices as int64; a boolean mask becomes the rows it selects."""
    idx = torch.as_tensor(idx)
    return idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long()


def _as_is(batch: torch.Tensor) -> torch.Tensor:
    return batch


class _Rows(Dataset):
    """Map-style view of :class:`LazyImages` whose batches decode in one worker call."""

    def __init__(self, images: LazyImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return self.images[indices]
