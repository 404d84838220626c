"""GPU figures: views, SimCLR steps (fp32, bf16, bf16 + compile), time to accuracy.

Augmentation throughput (SimCLR's views made on the device), SimCLR step throughput (ResNet-18,
views to optimizer step) and a time-to-accuracy run (SimCLR, then linear probes) on the embedded sample.

    python -m benchmarks gpu --json results.json      # on a CUDA machine
    python -m benchmarks gpu --quick                   # smoke test on a CPU

Prints one line per figure and writes them all as JSON, stamped with the machine and the commit.
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.augment import views_rate
from benchmarks.common import parser, quiet_trainer, report, seconds_per_call, write_json
from selfsup.callbacks import Warmup
from selfsup.data import ImageDataModule
from selfsup.data.views import SimCLRViews
from selfsup.evaluation import Features, LinearProbe
from selfsup.losses import NTXentLoss
from selfsup.methods import SimCLR
from selfsup.models import MLP, build_backbone
from selfsup.optim import OptimizerSpec


def bench_views(device: torch.device, batch: int, size: int, iters: int) -> float:
    """Images per second of SimCLR's views on one batch of random images on ``device``, all threads."""
    imgs = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    return views_rate(imgs, size, batch, iters, threads=None)


def bench_simclr_step(device: torch.device, batch: int, mode: str, iters: int) -> float:
    """Images per second through views + ResNet-18 (CIFAR stem) + projector + NT-Xent + Adam."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", cifar_stem=True).to(device)
    head = MLP([512, 512, 128], batch_norm=True).to(device)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    loss_fn = NTXentLoss(0.5)
    views = SimCLRViews(32)
    imgs = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    net = torch.compile(backbone) if mode == "bf16+compile" else backbone
    use_bf16 = mode != "fp32"

    def step() -> None:
        v0, v1 = views(imgs)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            z = head(net(torch.cat([v0, v1])))
        loss = loss_fn(*z.float().chunk(2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / seconds_per_call(step, repeats=iters, warmup=5 if mode != "bf16+compile" else 8, device=device)


def time_to_accuracy(device: torch.device, epochs: int, probe_epochs: int, batch: int) -> dict[str, Any]:
    """SimCLR ResNet-18 on the embedded 5k-image CIFAR-10 sample, then a linear probe;
    and the random-init probe of the same backbone."""
    dm = ImageDataModule(batch_size=batch, eval_batch_size=1000)
    dm.setup()
    kw: dict[str, Any] = {"accelerator": "gpu" if device.type == "cuda" else "cpu", "devices": 1}
    if device.type == "cuda":
        kw["precision"] = "bf16-mixed"
    arch = {"backbone": {"name": "resnet18", "cifar_stem": True}}
    out: dict[str, Any] = {"train_images": len(dm.train_set), "eval_images": len(dm.eval_set), "epochs": epochs}
    with tempfile.TemporaryDirectory() as tmp:
        L.seed_everything(0)
        model = SimCLR(
            **arch, temperature=0.5, optimizer=OptimizerSpec(lr=2e-3, weight_decay=1e-6), num_classes=dm.num_classes
        )
        t = time.perf_counter()
        trainer = quiet_trainer(
            max_epochs=epochs,
            limit_val_batches=0,
            callbacks=[Warmup(warmup_epochs=min(10, epochs // 10))],
            num_sanity_val_steps=0,
            default_root_dir=tmp,
            **kw,
        )
        trainer.fit(model, datamodule=dm)
        out["simclr_seconds"] = time.perf_counter() - t
        ckpt = Path(tmp) / "simclr.ckpt"
        trainer.save_checkpoint(ckpt)
        for name, path in (("random", None), ("simclr", str(ckpt))):
            L.seed_everything(0)
            probe = LinearProbe(
                **arch, num_classes=dm.num_classes, features=Features(checkpoint=path), optimizer=OptimizerSpec(lr=2e-3)
            )
            t = time.perf_counter()
            pt = quiet_trainer(
                max_epochs=probe_epochs,
                default_root_dir=tmp,
                num_sanity_val_steps=0,
                callbacks=[Warmup()],
                **kw,
            )
            pt.fit(probe, datamodule=dm)
            m = pt.validate(probe, datamodule=dm, verbose=False)[0]
            out[f"{name}_linear_top1"] = float(m["val/top1"])
            out[f"{name}_probe_seconds"] = time.perf_counter() - t
    return out


def micro(device: torch.device, q: bool, skip_compile: bool, report: Callable[[str, Any], None]) -> None:
    """The views and the steps at each precision (``q``: tiny sizes)."""
    report("views_img_per_s_32px_batch1024", bench_views(device, 64 if q else 1024, 32, 2 if q else 20))
    report("views_img_per_s_96px_batch512", bench_views(device, 16 if q else 512, 96, 2 if q else 20))
    modes = ["fp32", "bf16"] + ([] if skip_compile or q else ["bf16+compile"])
    for mode in modes:
        report(
            f"simclr_step_img_per_s_{mode}_batch512", bench_simclr_step(device, 8 if q else 512, mode, 2 if q else 20)
        )


def main(argv: list[str]) -> dict[str, Any]:
    """Measure every figure on this machine's GPU (or CPU), print each and write them with ``--json``."""
    ap = parser(__name__, __doc__)
    ap.add_argument("--json", "--out", type=Path, default=None, help="write the figures here")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke test")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--only-tta", action="store_true", help="only the time-to-accuracy run")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    q = args.quick
    res: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    say = functools.partial(report, res)
    if not args.only_tta:
        micro(device, q, args.skip_compile, say)
    tta = time_to_accuracy(device, 1 if q else args.epochs, 1 if q else 50, 64 if q else 512)
    for k, v in tta.items():
        say(f"tta_{k}", v)
    return write_json(args.json, res)
