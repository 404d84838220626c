"""Pictures for people: grids of what the network sees, logged to W&B and saved as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, make_grid

from selfsup.data.datamodule import ImageDataModule
from selfsup.data.patches import CENTER, NEIGHBORS
from selfsup.data.views import IMAGENET_MEAN, IMAGENET_STD
from selfsup.protocols import HasClassifier, HasViews, Reconstructs
from selfsup.tracking import WandbLogger
from selfsup.trainer_attrs import datamodule_of


def denormalize(
    x: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """Normalized float (B, 3, H, W) -> uint8 for display."""
    m = x.new_tensor(mean).view(1, -1, 1, 1)
    s = x.new_tensor(std).view(1, -1, 1, 1)
    return ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8)


def upscaled_grid(rows: torch.Tensor, nrow: int, scale: int, padding: int = 2) -> torch.Tensor:
    """uint8 images (N, 3, H, W) in a white-padded grid of ``nrow`` per row, upscaled ``scale``
    times (nearest) so that small images are visible: uint8 (3, H', W')."""
    grid = make_grid(rows.cpu(), nrow=nrow, padding=padding, pad_value=255)
    return grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def view_pairs_grid(images: torch.Tensor, *views: torch.Tensor, scale: int = 3) -> torch.Tensor:
    """One column per image: the original (uint8), then its normalized views, one row each
    (two for SimCLR; DINO's smaller local crops are drawn at the first view's size, nearest).

    Returns uint8 (3, H, W), upscaled ``scale`` times (nearest) so 32-pixel images are visible.
    """
    size = views[0].shape[-1]

    def resized(x: torch.Tensor, mode: str) -> torch.Tensor:
        if x.shape[-1] == size:
            return x
        return torch.nn.functional.interpolate(x.float(), size=(size, size), mode=mode)

    orig = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    rows = torch.cat([orig.round().clamp(0, 255).to(torch.uint8), *(denormalize(resized(v, "nearest")) for v in views)])
    return upscaled_grid(rows, images.shape[0], scale)


def log_training_figure(trainer, key: str, draw, caption: str = "") -> Path | None:
    """Draw a figure from the training images and log it (see :func:`log_image`).

    Call on every rank: ``trainer.log_dir`` is a collective call under DDP; only rank zero
    then calls ``draw(train_set)`` (an ``ImageSet`` -> uint8 (3, H, W)) and logs. Nothing
    happens without an ImageDataModule.
    """
    dm = datamodule_of(trainer)
    log_dir = trainer.log_dir or trainer.default_root_dir
    if not isinstance(dm, ImageDataModule) or dm.train_set is None or not trainer.is_global_zero:
        return None
    return log_image(trainer, log_dir, key, draw(dm.train_set), caption)


def spread(n: int, count: int) -> torch.Tensor:
    """``count`` indices spread evenly over ``n`` items (folders are stored class by class)."""
    return torch.linspace(0, n - 1, count).long()


def log_image(trainer, log_dir: str | None, key: str, image: torch.Tensor, caption: str = "") -> Path | None:
    """Log a uint8 (3, H, W) image to every W&B logger of ``trainer`` and save it as PNG in
    ``log_dir``; returns the PNG's path. Call on rank zero only; read ``trainer.log_dir`` on
    every rank beforehand (it is a collective call under DDP)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image.permute(1, 2, 0).numpy()], caption=[caption])
    if log_dir is None:
        return None
    path = Path(log_dir) / f"{key.replace('/', '_')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(image.contiguous(), str(path))
    return path


#: Colors of the 8 neighbor labels 0..7 and of the center patch in patch-grid figures.
LABEL_COLORS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"]
CENTER_COLOR = "#ffffff"


def patch_grid_figure(
    images: torch.Tensor, corners: torch.Tensor, patch: int, patches: torch.Tensor, scale: int = 4
) -> torch.Tensor:
    """For each image: the image with its 3x3 grid of patches outlined (center white,
    neighbors colored and labeled 0..7 in the fixed label order), and below it the 9
    patches as the network receives them (after preprocessing, rescaled for display).

    Args:
        images: uint8 (B, 3, H, W); corners: (B, 9, 2) top-left (y, x); patches: float
            (B, 9, 3, p, p) as fed to the backbone.
    Returns:
        uint8 (3, H', W') figure.
    """
    b, _, h, w = images.shape
    columns = []
    for i in range(b):
        big = images[i].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        c = corners[i].float() * scale
        boxes = torch.stack([c[:, 1], c[:, 0], c[:, 1] + patch * scale - 1, c[:, 0] + patch * scale - 1], dim=1)
        labels = ["C" if k == CENTER else str(NEIGHBORS.index(k)) for k in range(9)]
        colors = [CENTER_COLOR if k == CENTER else LABEL_COLORS[NEIGHBORS.index(k)] for k in range(9)]
        drawn = draw_bounding_boxes(big, boxes, labels=labels, colors=colors, width=2)
        # The patches as the network sees them, each min-max scaled, in their grid positions.
        p = patches[i].float()
        lo = p.flatten(1).amin(1).view(9, 1, 1, 1)
        hi = p.flatten(1).amax(1).view(9, 1, 1, 1)
        shown = ((p - lo) / (hi - lo).clamp_min(1e-6) * 255).round().to(torch.uint8)
        tile = make_grid(shown, nrow=3, padding=1, pad_value=255)
        tile = torch.nn.functional.interpolate(tile[None].float(), size=(w * scale, w * scale), mode="nearest")[0]
        columns.append(torch.cat([drawn, tile.to(torch.uint8)], dim=1))
    return make_grid(torch.stack(columns), nrow=b, padding=4, pad_value=255)


def draw_patches(model, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The figure for uint8 images (B, 3, H, W): grids drawn on the images, patches below."""
    g = torch.Generator(device=images.device).manual_seed(seed)
    patches, corners = model.patches(images, g)
    return patch_grid_figure(images.cpu(), corners.cpu(), model.grid_spec(images.shape[-1]).patch, patches.cpu())


class ViewsFigure(L.Callback):
    """Show what a contrastive module trains on: at the start of training, 8 training images with
    their views (``pl_module.views``: two, or DINO's global and local crops) as a W&B image
    ``train/views`` and ``train_views.png`` in the log folder. A module returns it from
    ``configure_callbacks``."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def draw(train_set) -> torch.Tensor:
            assert isinstance(pl_module, HasViews)  # the modules that return this callback have views
            images = train_set.images[spread(len(train_set), 8)].to(pl_module.device)
            views = pl_module.views(images, torch.Generator(device=pl_module.device).manual_seed(0))
            return view_pairs_grid(images, *views)

        log_training_figure(trainer, "train/views", draw, "rows: image, then each view")


class ReconstructionFigure(L.Callback):
    """Show what a masked autoencoder restores: after each validation, 8 fixed images of the
    evaluation split (of the training split when there is none) in three rows (the image, its
    masked patches gray, the restored image) as a W&B image ``val/reconstruction`` and
    ``val_reconstruction.png`` in the log folder. The mask is drawn from a fixed seed, so the
    figures of successive epochs compare. A module with ``reconstruct`` returns it."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective call: every rank
        dm = datamodule_of(trainer)
        if not isinstance(dm, ImageDataModule) or not trainer.is_global_zero:
            return
        assert isinstance(pl_module, Reconstructs)  # the modules that return this callback reconstruct
        train, evaluation = dm.splits()
        split = evaluation if len(evaluation) > 0 else train
        images = split.images[spread(len(split), 8)].to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        masked, restored = pl_module.reconstruct(images, torch.Generator(device=pl_module.device).manual_seed(0))
        pl_module.train(was_training)
        grid = upscaled_grid(torch.cat([images, masked, restored]), images.shape[0], 3)
        log_image(trainer, log_dir, "val/reconstruction", grid, "rows: image, masked, restored")


def confusion_figure(matrix: torch.Tensor, classes: list[str], cell: int = 28) -> torch.Tensor:
    """A confusion matrix as a picture: row i is true class i, column j the predicted class,
    cells shaded by the share of the row (white 0 to dark blue 1), the per-class accuracy (the
    diagonal's share) written at the end of each row. ``matrix``: (C, C) counts. Returns uint8
    (3, H, W)."""
    counts = matrix.double().cpu()
    share = counts / counts.sum(1, keepdim=True).clamp_min(1)
    c = len(counts)
    names = [str(n)[:14] for n in (classes if len(classes) == c else range(c))]
    left, top, right = 8 + 7 * max(len(n) for n in names), 20, 60
    img = Image.new("RGB", (left + c * cell + right, top + c * cell + 8), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 4), "predicted ->", fill="black")
    draw.text((left + c * cell + 6, 4), "acc.", fill="black")
    for i in range(c):
        y = top + i * cell
        draw.text((4, y + cell // 3), names[i], fill="black")
        for j in range(c):
            v = float(share[i, j])
            shade = (int(255 * (1 - 0.85 * v)), int(255 * (1 - 0.6 * v)), 255)  # white to blue
            draw.rectangle(
                [left + j * cell, y, left + (j + 1) * cell - 1, y + cell - 1], fill=shade, outline=(220, 220, 220)
            )
            if counts[i, j] > 0:
                draw.text(
                    (left + j * cell + 3, y + cell // 3), f"{int(counts[i, j])}", fill="white" if v > 0.5 else "black"
                )
        draw.text((left + c * cell + 6, y + cell // 3), f"{100 * float(share[i, i]):.0f}%", fill="black")
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def neighbors_grid(
    queries: torch.Tensor, neighbors: torch.Tensor, correct: torch.Tensor, scale: int = 2
) -> torch.Tensor:
    """One row per query: the query image, then its nearest training images, most similar first,
    each framed green when its class is the query's, red when not.

    Args:
        queries: uint8 (Q, 3, H, W); neighbors: uint8 (Q, K, 3, H, W); correct: bool (Q, K).
    Returns:
        uint8 (3, H', W'), upscaled ``scale`` times.
    """
    q, k = correct.shape
    framed = neighbors.clone()
    color = torch.where(
        correct[..., None], torch.tensor([0, 170, 0], dtype=torch.uint8), torch.tensor([200, 0, 0], dtype=torch.uint8)
    )[..., None, None]  # (Q, K, 3, 1, 1)
    for edge in (framed[..., :2, :], framed[..., -2:, :]):
        edge[:] = color
    for edge in (framed[..., :, :2], framed[..., :, -2:]):
        edge[:] = color
    rows = torch.cat([queries[:, None], framed], dim=1).flatten(0, 1)
    return upscaled_grid(rows, k + 1, scale, padding=3)


class ConfusionFigure(L.Callback):
    """The confusion matrix and per-class accuracy of ``pl_module.classifier`` as ``val/confusion``
    in W&B and ``val_confusion.png`` in the run folder: after the last epoch's validation and after
    ``validate`` (drawing every epoch of a 30-epoch probe would cost more than the probe). A
    transfer module returns it from ``configure_callbacks``."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, HasClassifier) or pl_module.classifier is None:
            return
        # The head is a selfsup.evaluation.linear.Classifier (which imports this module); nn.Module
        # types a submodule it looks up as Tensor | Module.
        confusion = cast(MulticlassConfusionMatrix, pl_module.classifier.confusion)
        fitting = trainer.state.fn == "fit"
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if trainer.sanity_checking or (fitting and not last):
            confusion.reset()
            return
        matrix = confusion.compute()  # synced over ranks
        confusion.reset()
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective call: every rank
        if trainer.is_global_zero:
            dm = datamodule_of(trainer)
            classes = dm.classes if isinstance(dm, ImageDataModule) else []
            log_image(
                trainer,
                log_dir,
                "val/confusion",
                confusion_figure(matrix, classes),
                "rows: true class, columns: predicted; right: per-class accuracy",
            )


def search_figure(
    table: list[dict[str, float]], chosen: tuple[float, float], cell: tuple[int, int] = (64, 26)
) -> torch.Tensor:
    """A linear probe's search as a table: one column per rate, one row per weight decay, each
    cell the held-out top-1 of that setting shaded from the worst (white) to the best (dark
    green), the chosen one framed in black. ``table``: ``{"lr", "weight_decay",
    "holdout_top1"}`` rows. Returns uint8 (3, H, W)."""
    lrs = sorted({r["lr"] for r in table})
    wds = sorted({r["weight_decay"] for r in table})
    acc = {(r["lr"], r["weight_decay"]): r["holdout_top1"] for r in table}
    lo, hi = min(acc.values()), max(acc.values())
    w, h = cell
    left, top = 84, 40
    img = Image.new("RGB", (left + w * len(lrs) + 8, top + h * len(wds) + 8), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), "held-out top-1 (%) by rate (columns) and weight decay (rows)", fill="black")
    for j, lr in enumerate(lrs):
        draw.text((left + j * w + 4, top - 14), f"{lr:g}", fill="black")
    for i, wd in enumerate(wds):
        y = top + i * h
        draw.text((4, y + h // 3), f"wd {wd:g}", fill="black")
        for j, lr in enumerate(lrs):
            x = left + j * w
            if (lr, wd) not in acc:
                continue
            v = (acc[lr, wd] - lo) / (hi - lo) if hi > lo else 1.0
            shade = (int(255 * (1 - 0.8 * v)), int(255 * (1 - 0.45 * v)), int(255 * (1 - 0.8 * v)))
            framed = (lr, wd) == tuple(chosen)
            draw.rectangle(
                [x, y, x + w - 1, y + h - 1],
                fill=shade,
                outline="black" if framed else (220, 220, 220),
                width=3 if framed else 1,
            )
            draw.text((x + 6, y + h // 3), f"{100 * acc[lr, wd]:.1f}", fill="white" if v > 0.6 else "black")
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
