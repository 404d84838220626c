"""Relative location against the random-init baseline on an image folder, probing several depths.

Pretrains ``RelativeLocation`` for ``--epochs``, then trains linear probes on the frozen
backbone at the last stage and the one before, and the same probes on the random-init
backbone. Evaluation on the folder's val/test split, or a fixed, seeded held-out share of
train (``--val-fraction``, 20%).

    python scripts/relloc_experiment.py --root DIR --image-size 64 --epochs 30 [--accelerator gpu]

Prints one line per figure and writes them as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L

from selfsup.callbacks import Warmup
from selfsup.data import ImageDataModule
from selfsup.methods import LinearProbe, RelativeLocation
from selfsup.methods.common import OptimizerSpec
from selfsup.methods.transfer import Features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    dm = ImageDataModule(root=args.root, image_size=args.image_size, batch_size=args.batch,
                         val_fraction=args.val_fraction, cache_dir=None)
    dm.setup()
    arch = {"backbone": {"name": args.backbone, "cifar_stem": args.cifar_stem, "width": args.width}}
    kw = {"accelerator": args.accelerator, "devices": 1, "precision": args.precision, "logger": False,
          "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
    res: dict = {"train_images": len(dm.train_set), "eval_images": len(dm.eval_set), **vars(args)}
    res["out"] = str(args.out) if args.out else None

    def report(key: str, value) -> None:
        res[key] = value
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        L.seed_everything(0)
        model = RelativeLocation(**arch, grid=args.grid, color=args.color, pixelate_p=args.pixelate,
                                 optimizer=OptimizerSpec(lr=args.lr, weight_decay=1e-5))
        t = time.perf_counter()
        trainer = L.Trainer(max_epochs=args.epochs, default_root_dir=tmp,
                            callbacks=[Warmup(warmup_epochs=min(2, args.epochs / 10))], **kw)
        trainer.fit(model, datamodule=dm)
        report("pretrain_seconds", time.perf_counter() - t)
        report("pretext_top1", float(trainer.validate(model, datamodule=dm, verbose=False)[0]["val/pretext_top1"]))
        ckpt = Path(tmp) / "relloc.ckpt"
        trainer.save_checkpoint(ckpt)
        for name, path in (("random", None), ("relative_location", str(ckpt))):
            for stage in (-1, -2):
                L.seed_everything(0)
                probe = LinearProbe(**arch, num_classes=dm.num_classes, optimizer=OptimizerSpec(lr=args.lr),
                                    features=Features(checkpoint=path, stage=stage,
                                                      input_norm="per_image" if path else "channel"))
                pt = L.Trainer(max_epochs=args.probe_epochs, default_root_dir=tmp, num_sanity_val_steps=0,
                               callbacks=[Warmup()], **kw)
                pt.fit(probe, datamodule=dm)
                top1 = float(pt.validate(probe, datamodule=dm, verbose=False)[0]["val/top1"])
                report(f"{name}_linear_top1_stage{stage % probe.backbone.num_stages}", top1)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
