"""The in-memory training loader: batches by one tensor index, resumable in the middle of an epoch.

Lightning saves the state of every training loader that has ``state_dict`` / ``load_state_dict``
with a checkpoint and restores it before the loop continues. The position saved is the number
of batches *trained* this epoch, read from the trainer, not the number the loader has handed
out: Lightning fetches one batch ahead (more with worker processes), so the loader's own count
would skip batches after a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from selfsup.data.splits import ImageSet


class TensorImageDataset(Dataset):
    """Map-style dataset over an :class:`ImageSet`; ``__getitems__`` fetches a whole batch by
    one tensor index instead of stacking B single items."""

    def __init__(self, images: ImageSet) -> None:
        self.set = images

    def __len__(self) -> int:
        return len(self.set)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.set.images[i], "label": self.set.labels[i], "index": torch.tensor(i)}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"image": self.set.images[idx], "label": self.set.labels[idx], "index": idx}


def collate(batch: Any) -> Any:
    """Batches from ``__getitems__`` arrive collated already."""
    return batch if isinstance(batch, dict) else default_collate(batch)


class ResumableSampler(DistributedSampler):
    """This rank's share of a permutation drawn from ``seed + epoch`` (as ``DistributedSampler``,
    which Lightning therefore leaves in place under DDP), starting after ``skip`` indices in the
    first pass after :meth:`resume`.

    Args:
        dataset: anything with ``len``.
        num_replicas / rank: the job's world size and this process's rank.
        seed: of the permutations (one per epoch, the same on every rank).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._skip: tuple[int, int] | None = None  # (epoch, indices already trained)

    def resume(self, epoch: int, trained: int) -> None:
        """Start the pass of ``epoch`` after its first ``trained`` indices."""
        self._skip = (epoch, trained)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._skip is not None:
            epoch, trained = self._skip
            self._skip = None
            if epoch == self.epoch:
                indices = indices[trained:]
        return iter(indices)


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose ``state_dict`` is the epoch and the
    number of batches trained in it, so that Lightning's mid-epoch checkpoints resume exactly.

    Args:
        trained_batches: the batches of the current epoch the trainer has trained (read when a
            checkpoint is written); None: 0 (no trainer).
        Other arguments as DataLoader's; ``sampler`` must be a ResumableSampler.
    """

    # Checked in __init__; a DataLoader's sampler cannot be replaced after it.
    sampler: ResumableSampler

    def __init__(self, *args: Any, trained_batches: Callable[[], int] | None = None, **kwargs: Any) -> None:
        # A generator of its own: without one, every pass draws its workers' base seed from the
        # global random stream. That draw comes after an epoch-end checkpoint in a run that goes
        # on, but before the stream is restored in a run resumed from it, whose views (drawn from
        # the global stream) then all differ. Seeded from (seed, epoch) at each pass instead.
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableLoader needs a ResumableSampler")
        self.trained_batches = trained_batches

    def __iter__(self) -> Any:
        if self.generator is not None:
            self.generator.manual_seed(self.sampler.seed * 1_000_003 + self.sampler.epoch)
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        trained = self.trained_batches() if self.trained_batches is not None else 0
        assert self.batch_size is not None  # the DataModule gives a batch size, not a batch sampler
        return {"epoch": int(self.sampler.epoch), "batches": int(trained), "batch_size": int(self.batch_size)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(state["epoch"], state["batches"] * state["batch_size"])
