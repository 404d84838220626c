"""The cached-feature linear probe against the classic augmented probe, in one process.

Both train a linear head on the same frozen backbone, with the same Lightning Trainer, batch,
epochs, rate scaling, schedule and per-epoch validation, on the same images:

- ours (``LinearProbe`` as the configs run it): the rate and weight decay chosen on a held-out
  tenth of the training images (``search``), each image's features computed once and cached;
- classic (``augment: true, cache_features: false``, as solo-learn and lightly probe): every
  epoch each training image is randomly cropped and flipped and passed through the frozen
  backbone, every validation image too; it gets the rate and weight decay ours chose, for free.

    python -m benchmarks probe [--checkpoint CKPT] [--backbone resnet18] [--epochs 30]
                               [--train-images 2000] [--eval-images 1000] [--json FILE]
    python -m benchmarks probe --quick   # small CNN, 1,000 images, 10 epochs: a minute

Prints seconds to result and top-1 of each, and their ratio (above 1: ours is faster);
``--json`` writes them as ``{"comparisons": [{"name": "linear_probe", ...}], ...}``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L

from benchmarks.common import machine, parser, quiet_trainer, write_json
from selfsup.callbacks import LearningRateScaling, Warmup
from selfsup.data import ImageDataModule
from selfsup.evaluation import Features, LinearProbe, ProbeSearch
from selfsup.optim import OptimizerSpec

# The grid of configs/linear_probe/*.yaml.
SEARCH = ProbeSearch(lrs=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3), weight_decays=(0.0, 1e-4))


def run_probe(
    dm: ImageDataModule, epochs: int, folder: Path, seed: int = 0, precision: str = "32-true", **probe: Any
) -> dict[str, float]:
    """Fit one probe and validate it: seconds (fit and validation, the backbone passes included)
    and the figures ``trainer.validate`` returns. ``seed``: of the backbone's initialization and
    the batch order (the same for both probes); ``precision``: the Trainer's."""
    L.seed_everything(seed, verbose=False)
    model = LinearProbe(num_classes=dm.num_classes, **probe)
    trainer = quiet_trainer(
        accelerator="auto",
        devices=1,
        precision=precision,
        max_epochs=epochs,
        num_sanity_val_steps=0,
        default_root_dir=str(folder),
        callbacks=[LearningRateScaling("sqrt", 256), Warmup(decay="cosine")],
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "top1": float(metrics["val/top1"])}
    if model.chosen is not None:
        out.update(lr=model.chosen.lr, weight_decay=model.chosen.weight_decay)
    return out


def main(argv: list[str]) -> dict[str, Any]:
    """Fit both probes on the same images and print (and with ``--json`` write) the comparison."""
    ap = parser(__name__, __doc__)
    ap.add_argument("--root", default=None, help="labeled images (default: the embedded CIFAR-10 sample)")
    ap.add_argument(
        "--checkpoint", default=None, help="a stage checkpoint whose backbone is probed (default: random init)"
    )
    ap.add_argument("--backbone", default="resnet18", help="the backbone's name (as backbone.name)")
    ap.add_argument("--width", type=int, default=64, help="of small_cnn")
    ap.add_argument("--no-cifar-stem", dest="cifar_stem", action="store_false")
    ap.add_argument("--input-norm", default="channel", choices=["channel", "per_image"])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="of the backbone's initialization and the batch order")
    ap.add_argument("--quick", action="store_true", help="small CNN (width 32), 1,000 training images, 10 epochs")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--out", default="runs/bench_probe", help="the probes' run folders")
    a = ap.parse_args(argv)
    if a.quick:
        a.backbone, a.width, a.train_images, a.eval_images, a.epochs = "small_cnn", 32, 1000, 500, 10

    dm = ImageDataModule(
        root=a.root,
        image_size=a.image_size,
        batch_size=a.batch_size,
        max_train_images=a.train_images,
        max_eval_images=a.eval_images,
    )
    dm.setup("fit")
    both = {
        "backbone": {"name": a.backbone, "cifar_stem": a.cifar_stem, "width": a.width},
        "features": Features(checkpoint=a.checkpoint, input_norm=a.input_norm),
    }
    ours = run_probe(dm, a.epochs, Path(a.out) / "cached", a.seed, search=SEARCH, **both)
    chosen = OptimizerSpec(name="adam", lr=ours["lr"], weight_decay=ours["weight_decay"])
    classic = run_probe(
        dm, a.epochs, Path(a.out) / "classic", a.seed, augment=True, cache_features=False, optimizer=chosen, **both
    )
    ratio = classic["seconds"] / ours["seconds"]
    result: dict[str, Any] = {
        "setup": {
            "backbone": a.backbone,
            "checkpoint": a.checkpoint,
            "root": a.root or "(embedded sample)",
            "train_images": len(dm.train_set),
            "eval_images": len(dm.eval_set),
            "image_size": dm.image_size,
            "epochs": a.epochs,
            "batch_size": a.batch_size,
            "seed": a.seed,
            "search": SEARCH.as_dict(),
        },
        "ours": ours,
        "classic": classic,
        "comparisons": [
            {
                "name": "linear_probe",
                "ours": ours["seconds"],
                "theirs": classic["seconds"],
                "unit": "s",
                "ratio": ratio,
            }
        ],
        "top1_difference_points": 100 * (ours["top1"] - classic["top1"]),
    }
    here = machine()
    print(
        f"| probe | seconds to result | top-1 |\n|---|---:|---:|\n"
        f"| cached, tuned on held-out training images (ours) | {ours['seconds']:.1f} | {100 * ours['top1']:.1f}% |\n"
        f"| classic: augmented images through the backbone every epoch | {classic['seconds']:.1f} | "
        f"{100 * classic['top1']:.1f}% |\n\n"
        f"{ratio:.1f}x faster, {result['top1_difference_points']:+.1f} points "
        f"(lr={ours['lr']!r}, weight_decay={ours['weight_decay']!r} chosen; {a.backbone}, {len(dm.train_set)} train / "
        f"{len(dm.eval_set)} eval images, {a.epochs} epochs; {here['cpu']}, {here['cores']} cores)"
    )
    return write_json(a.json, result)
