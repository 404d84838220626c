"""Batch size and learning rate at CPU scale (Goyal et al. 2017, "ImageNet in 1 Hour").

Trains the same network on real CIFAR-10 images for a fixed number of epochs at a range of
global batch sizes, under three learning-rate policies:

  fixed           the base rate at every batch size (fewer, equally long steps as the batch grows);
  linear          base rate x batch / reference (lr_scaling rule linear), no warmup;
  linear+warmup   the same, reached by a linear warmup from 0 over the first epochs.

All three decay with a cosine to 0 at the last step. Writes OUT/results.json (stamped with the
machine and the commit), OUT/batch_size.png (final top-1 against batch size) and OUT/lr_curves.png
(the rate of every step).

    python -m benchmarks batch_size --root /path/to/cifar10 --out runs/batch_size
    python -m benchmarks batch_size --plot-from runs/batch_size/results.json --out runs/batch_size

The network is trained with labels (the setting of the paper, and the fastest to measure);
the same callbacks drive every selfsup stage.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import parser, quiet_trainer, write_json
from selfsup.callbacks import LearningRateScaling, Warmup
from selfsup.data import ImageDataModule
from selfsup.evaluation import FineTune
from selfsup.optim import OptimizerSpec

POLICIES = ("fixed", "linear", "linear+warmup")


class StepLog(L.Callback):
    """The rate of every optimizer step and the mean training loss of each epoch."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.losses: list[float] = []

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.losses.append(float(trainer.callback_metrics.get("train/loss_epoch", math.nan)))


def run(args: argparse.Namespace, batch: int, policy: str, tmp: str) -> dict[str, Any]:
    """Train at one batch size under one policy; its top-1, time and the rate of every step."""
    L.seed_everything(args.seed, verbose=False)
    dm = ImageDataModule(
        root=args.root,
        batch_size=batch,
        eval_batch_size=1000,
        max_train_images=args.train_images,
        max_eval_images=args.eval_images,
    )
    model = FineTune(
        num_classes=dm.num_classes,
        backbone={"name": args.backbone, "cifar_stem": args.cifar_stem, "width": args.width},
        optimizer=OptimizerSpec("sgd", lr=args.base_lr, weight_decay=args.weight_decay, momentum=0.9),
    )
    log = StepLog()
    callbacks = [
        LearningRateScaling("none" if policy == "fixed" else "linear", reference_batch=args.reference),
        Warmup(warmup_epochs=args.warmup_epochs if policy == "linear+warmup" else 0.0),
        log,
    ]
    trainer = quiet_trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=args.epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=tmp,
    )
    t = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - t
    evaluator = quiet_trainer(accelerator=args.accelerator, devices=1, precision=args.precision, default_root_dir=tmp)
    top1 = float(evaluator.validate(model, datamodule=dm, verbose=False)[0]["val/top1"])
    return {
        "batch": batch,
        "policy": policy,
        "top1": top1,
        "seconds": seconds,
        "steps": len(log.lrs),
        "peak_lr": max(log.lrs),
        "lrs": log.lrs,
        "epoch_losses": log.losses,
        "diverged": not all(math.isfinite(x) for x in log.losses),
    }


def plot(results: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> None:
    """OUT/batch_size.png (top-1 against batch size per policy) and OUT/lr_curves.png (the rates)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fixed": "tab:gray", "linear": "tab:orange", "linear+warmup": "tab:blue"}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for policy in POLICIES:
        rows = sorted((r for r in results if r["policy"] == policy), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in rows], [100 * r["top1"] for r in rows], "o-", color=colors[policy], label=policy)
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.batches, [str(b) for b in args.batches])
    ax.set_xlabel("global batch size (images per optimizer step)")
    ax.set_ylabel("top-1 on held-out images (%)")
    ax.set_title(
        f"{args.backbone}, {args.epochs} epochs of {args.train_images} images at every batch size\n"
        f"base lr {args.base_lr} at batch {args.reference}; warmup {args.warmup_epochs:g} epochs",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "batch_size.png")
    plt.close(fig)

    # The rates themselves: each policy at the largest batch, and linear+warmup at every batch.
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    big = args.curves_batch or max(args.batches)
    for policy in POLICIES:
        (r,) = [r for r in results if r["policy"] == policy and r["batch"] == big]
        a.plot(
            [args.epochs * (i + 0.5) / r["steps"] for i in range(r["steps"])],
            r["lrs"],
            color=colors[policy],
            label=policy,
        )
    a.set_title(f"batch {big}: the three policies", fontsize=9)
    cmap = plt.get_cmap("viridis")
    for i, bs in enumerate(sorted(args.batches)):
        (r,) = [r for r in results if r["policy"] == "linear+warmup" and r["batch"] == bs]
        b.plot(
            [args.epochs * (k + 0.5) / r["steps"] for k in range(r["steps"])],
            r["lrs"],
            color=cmap(i / max(1, len(args.batches) - 1)),
            label=f"batch {bs}",
        )
    b.set_yscale("log")
    b.set_ylim(bottom=1e-3 * args.base_lr * min(args.batches) / args.reference)  # the cosine's last steps approach 0
    b.set_title("linear+warmup at every batch size (log scale)", fontsize=9)
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lr_curves.png")
    plt.close(fig)


def main(argv: list[str]) -> dict[str, Any] | None:
    """Every batch size under every policy (or only the figures of ``--plot-from``); results and figures."""
    ap = parser(__name__, __doc__)
    ap.add_argument(
        "--root", default=None, help="an image folder (ROOT/train, ROOT/test); default: the embedded sample"
    )
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--eval-images", type=int, default=5000)
    ap.add_argument("--backbone", default="small_cnn", choices=["small_cnn", "resnet18", "resnet50"])
    ap.add_argument("--cifar-stem", action="store_true", help="ResNet stem for 32-px images")
    ap.add_argument("--width", type=int, default=16, help="small CNN width")
    ap.add_argument("--base-lr", type=float, default=0.1, help="the rate at --reference images per step")
    ap.add_argument("--reference", type=int, default=256)
    ap.add_argument("--warmup-epochs", type=float, default=2.0)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/batch_size"))
    ap.add_argument("--plot-from", type=Path, default=None, help="only draw the figures of an earlier results.json")
    ap.add_argument(
        "--curves-batch",
        type=int,
        default=None,
        help="the batch whose three rate curves are drawn (default: the largest)",
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_from:
        saved = json.loads(args.plot_from.read_text())
        for k, v in saved["args"].items():
            if k not in ("out", "plot_from", "curves_batch"):
                setattr(args, k, v)
        plot(saved["results"], args, args.out)
        return None
    torch.set_float32_matmul_precision("high")

    results: list[dict[str, Any]] = []
    written: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batches:
            for policy in POLICIES:
                r = run(args, batch, policy, tmp)
                results.append(r)
                print(
                    f"batch {batch:5d}  {policy:14s} top-1 {100 * r['top1']:5.1f}%  peak lr {r['peak_lr']:.4g}  "
                    f"{r['steps']} steps  {r['seconds']:.0f} s{'  (diverged)' if r['diverged'] else ''}",
                    flush=True,
                )
                # After every run: a long experiment stopped early keeps what it measured.
                arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
                written = write_json(args.out / "results.json", {"args": arguments, "results": results})
    try:
        plot(results, args, args.out)
    except ImportError:  # e.g. a GPU machine without matplotlib: draw the figures elsewhere
        print(f"matplotlib is missing: draw the figures with --plot-from {args.out / 'results.json'}")
        return written
    print(f"wrote {args.out / 'results.json'}, {args.out / 'batch_size.png'}, {args.out / 'lr_curves.png'}")
    return written
