"""Relative location against random init on an image folder, linear probes at two depths.

Pretrains ``RelativeLocation`` for ``--epochs``, then trains linear probes on the frozen
backbone at the last stage and the one before, and the same probes on the random-init
backbone. Evaluation on the folder's val/test split, or a fixed, seeded held-out share of
train (``--val-fraction``, 20%).

    python -m benchmarks relative_location --root DIR --image-size 64 --epochs 30 [--accelerator gpu]

Prints one line per figure and writes them as JSON with ``--json`` (or ``--out``), stamped with the
machine and the commit.
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L

from benchmarks.common import parser, quiet_trainer, report, write_json
from selfsup.callbacks import Warmup
from selfsup.data import ImageDataModule
from selfsup.evaluation import Features, LinearProbe
from selfsup.methods import RelativeLocation
from selfsup.optim import OptimizerSpec


def main(argv: list[str]) -> dict[str, Any]:
    """Pretrain, probe both backbones at two depths, print and write the figures."""
    ap = parser(__name__, __doc__)
    ap.add_argument("--root", required=True)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--cifar-stem", action="store_true")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--grid", default="kolesnikov")
    ap.add_argument("--color", default="drop")
    ap.add_argument("--pixelate", type=float, default=1 / 3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--probe-epochs", type=int, default=50)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--json", "--out", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)

    dm = ImageDataModule(
        root=args.root,
        image_size=args.image_size,
        batch_size=args.batch,
        val_fraction=args.val_fraction,
        cache_dir=None,
    )
    dm.setup()
    arch = {"backbone": {"name": args.backbone, "cifar_stem": args.cifar_stem, "width": args.width}}
    kw: dict[str, Any] = {"accelerator": args.accelerator, "devices": 1, "precision": args.precision}
    res: dict[str, Any] = {"train_images": len(dm.train_set), "eval_images": len(dm.eval_set), **vars(args)}
    res["json"] = str(args.json) if args.json else None
    say = functools.partial(report, res)

    with tempfile.TemporaryDirectory() as tmp:
        L.seed_everything(0)
        model = RelativeLocation(
            **arch,
            grid=args.grid,
            color=args.color,
            pixelate_p=args.pixelate,
            optimizer=OptimizerSpec(lr=args.lr, weight_decay=1e-5),
        )
        t = time.perf_counter()
        trainer = quiet_trainer(
            max_epochs=args.epochs,
            default_root_dir=tmp,
            callbacks=[Warmup(warmup_epochs=min(2, args.epochs / 10))],
            **kw,
        )
        trainer.fit(model, datamodule=dm)
        say("pretrain_seconds", time.perf_counter() - t)
        say("pretext_top1", float(trainer.validate(model, datamodule=dm, verbose=False)[0]["val/pretext_top1"]))
        ckpt = Path(tmp) / "relloc.ckpt"
        trainer.save_checkpoint(ckpt)
        for name, path in (("random", None), ("relative_location", str(ckpt))):
            for stage in (-1, -2):
                L.seed_everything(0)
                probe = LinearProbe(
                    **arch,
                    num_classes=dm.num_classes,
                    optimizer=OptimizerSpec(lr=args.lr),
                    features=Features(checkpoint=path, depth=stage, input_norm="per_image" if path else "channel"),
                )
                pt = quiet_trainer(
                    max_epochs=args.probe_epochs,
                    default_root_dir=tmp,
                    num_sanity_val_steps=0,
                    callbacks=[Warmup()],
                    **kw,
                )
                pt.fit(probe, datamodule=dm)
                top1 = float(pt.validate(probe, datamodule=dm, verbose=False)[0]["val/top1"])
                say(f"{name}_linear_top1_stage{stage % probe.backbone.num_depths}", top1)
    return write_json(args.json, res)
