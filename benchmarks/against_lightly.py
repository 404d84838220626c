"""selfsup against lightly side by side: views, SimCLR steps, the linear probe.

Both run in one process on one machine: the same backbone, image size and batch, in rounds that run
the two sides back to back (the round with the median ratio counts).

    pip install -e ".[bench]"          # lightly: only for this benchmark, never a runtime dependency
    python -m benchmarks lightly [--quick] [--json FILE] [--markdown FILE]
    python -m benchmarks lightly --quick --json benchmarks/results/bench_cpu_quick.json \\
        --markdown benchmarks/results/bench_cpu_quick.md

Comparisons (``ratio`` above 1: selfsup is better):

- ``data_pipeline``: images/s per core of SimCLR's two views (crop, flip, color jitter,
  grayscale, normalization; no blur at 32 px): ``SimCLRViews`` on uint8 batches on one thread,
  against lightly's ``SimCLRTransform`` (the same parameters) on PIL images on one core;
  ``data_pipeline_compiled`` the same with ``views.compile`` (the color steps through
  ``torch.compile``);
- ``simclr_step``: images/s of whole training steps (data, views, forward, backward, optimizer)
  through a Lightning Trainer: selfsup's ``SimCLR`` against a plain LightningModule built from
  lightly's parts (its transform in DataLoader workers, one per core; its ``NTXentLoss`` and
  ``SimCLRProjectionHead``), both at ``--precision`` (by default bf16 autocast where the CPU has
  bf16 instructions, as a user of either would run it there, else fp32);
- ``simclr_step_vs_compute``: selfsup's whole steps against the bare step of the same network on
  ready-made tensors of the same shape, same precision (the compute bound);
- ``simclr_step_fp32`` and ``simclr_step_vs_compute_fp32``: the same two in fp32, when
  ``--precision`` is another (not in ``--quick``);
- ``linear_probe``: seconds to result of the linear probe (``python -m benchmarks probe``): cached
  features with the search, against the classic augmented probe.

Each entry also has the peak memory of either side (resident memory of the process and its
workers above what it was before the run). The process keeps freed memory as the ``selfsup``
command does (``selfsup.runtime.keep_freed_memory``), for both sides. The JSON is stamped with the
machine and the commit (``benchmarks.common.write_json``); the table's first line names both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from PIL import Image

from benchmarks.augment import PilImages, pil_images, views_rate
from benchmarks.common import PeakMemory, parser, quiet_trainer, seconds_per_call, write_json
from benchmarks.probe import SEARCH, run_probe
from selfsup.data import ImageDataModule
from selfsup.data.sources import load_sample_split
from selfsup.data.views import FELL_BACK
from selfsup.evaluation import OnlineSpec
from selfsup.losses import NTXentLoss
from selfsup.methods import SimCLR
from selfsup.models import MLP
from selfsup.models.backbones import BackboneSpec
from selfsup.optim import OptimizerSpec
from selfsup.runtime import fast_precision, keep_freed_memory

#: CPU targets of the issue ("The fastest SimCLR on one machine").
TARGETS = {"data_pipeline": 10.0, "simclr_step": 1.5, "simclr_step_vs_compute": 0.9, "linear_probe": 20.0}
T = TypeVar("T")


# -- data_pipeline ---------------------------------------------------------------------------
def lightly_transform(size: int) -> Any:
    """lightly's SimCLR views with selfsup's parameters (imported here: lightly is optional)."""
    from lightly.transforms import SimCLRTransform

    # cj_strength 0.5 x lightly's (0.8, 0.8, 0.8, 0.2) = SimCLR's (0.4, 0.4, 0.4, 0.1), as ours.
    return SimCLRTransform(input_size=size, cj_strength=0.5, gaussian_blur=0.0)


def lightly_views_per_core(pils: list[Image.Image]) -> float:
    """Images per second of lightly's transform (two views each) on one core."""
    t = lightly_transform(pils[0].size[0])

    def one_pass() -> None:  # the views dropped as they come, as a training loop would
        for p in pils:
            t(p)

    return len(pils) / seconds_per_call(one_pass)


# -- simclr_step -----------------------------------------------------------------------------
class StepTimer(L.Callback):
    """Images/s over the training steps after the first ``skip`` (workers started, caches warm)."""

    def __init__(self, skip: int) -> None:
        self.skip, self.images = skip, 0
        self.t0: float | None = None
        self.t1 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.skip:
            self.t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, out: Any, batch: Any, idx: int
    ) -> None:
        if self.t0 is not None:
            self.images += len(batch["index"]) if isinstance(batch, dict) else len(batch[1])
            self.t1 = time.perf_counter()

    @property
    def rate(self) -> float:
        assert self.t0 is not None, f"fewer than {self.skip + 1} steps ran"
        return self.images / (self.t1 - self.t0)


class LightlySimCLR(L.LightningModule):
    """SimCLR the way lightly's examples build it: its projection head and NT-Xent loss, each
    view through the backbone in its own pass."""

    def __init__(self, backbone: torch.nn.Module, hidden: int, dim: int) -> None:
        super().__init__()
        from lightly.loss import NTXentLoss as LightlyNTXent
        from lightly.models.modules import SimCLRProjectionHead

        self.backbone = backbone
        self.head = SimCLRProjectionHead(backbone.num_features, hidden, dim)
        self.criterion = LightlyNTXent(temperature=0.5)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x0, x1), _ = batch
        return self.criterion(self.head(self.backbone(x0)), self.head(self.backbone(x1)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def trainer_for(steps: int, timer: StepTimer, folder: str, precision: str) -> L.Trainer:
    """The Trainer of either side's steps: one device, no validation."""
    return quiet_trainer(
        accelerator="auto",
        devices=1,
        precision=precision,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
        default_root_dir=folder,
    )


def ours_steps(args: argparse.Namespace, folder: str, precision: str, dm: ImageDataModule) -> float:
    """``dm``: decoded once for all rounds (setup keeps what it loaded)."""
    L.seed_everything(0, verbose=False)
    model = SimCLR(
        backbone=BackboneSpec("small_cnn", width=args.width),
        proj_hidden=args.hidden,
        proj_dim=128,
        optimizer={"name": "adam", "lr": 1e-3},
        online=OnlineSpec(enabled=False),
    )
    timer = StepTimer(skip=3)
    trainer_for(args.steps, timer, folder, precision).fit(model, datamodule=dm)
    return timer.rate


def lightly_steps(args: argparse.Namespace, pils: list[Image.Image], folder: str, precision: str) -> float:
    """Images/s of lightly's side: its transform in DataLoader workers, its head and loss."""
    L.seed_everything(0, verbose=False)
    loader = torch.utils.data.DataLoader(
        PilImages(pils, lightly_transform(32)),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    model = LightlySimCLR(BackboneSpec("small_cnn", width=args.width).build(), args.hidden, 128)
    timer = StepTimer(skip=3)
    trainer_for(args.steps, timer, folder, precision).fit(model, train_dataloaders=loader)
    return timer.rate


def bare_steps(args: argparse.Namespace, precision: str) -> float:
    """The same network as ``ours_steps`` (backbone, projector, NT-Xent, Adam) on two ready-made
    normalized views: forward, backward and optimizer only, under the same autocast."""
    torch.manual_seed(0)
    backbone = BackboneSpec("small_cnn", width=args.width).build()
    head = MLP([backbone.num_features, args.hidden, 128], batch_norm=True)
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-3)
    loss_fn = NTXentLoss(0.5)
    b = args.batch_size
    v = torch.randn(2 * b, 3, 32, 32)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
            z0, z1 = head(backbone(v)).chunk(2)
            loss = loss_fn(z0, z1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # As StepTimer: the first 3 steps (oneDNN's kernels, the optimizer's state) are not timed.
    return b / seconds_per_call(step, repeats=args.steps - 3, warmup=3)


# -- the run ---------------------------------------------------------------------------------
def measure(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the peak memory in MB that it added (its DataLoader workers included)."""
    with PeakMemory() as m:
        value = fn()
    return value, m.mb


def comparison(
    name: str,
    ours: list[tuple[float, float]],
    theirs: list[tuple[float, float]],
    unit: str,
    higher_is_better: bool = True,
) -> dict[str, Any]:
    """The two sides' (value, peak MB) per round. Each round ran them back to back, so their
    ratio within a round is free of this machine's drift (10-30% over minutes); the round with
    the median ratio is reported, each comparison its own (``rounds``: every round's values).
    ``ratio`` is ours / theirs, or theirs / ours for times (``higher_is_better`` False)."""
    ratios = [(o[0] / t[0] if higher_is_better else t[0] / o[0]) for o, t in zip(ours, theirs, strict=True)]
    ratio = statistics.median_low(ratios)
    k = ratios.index(ratio)
    return {
        "name": name,
        "ours": ours[k][0],
        "theirs": theirs[k][0],
        "unit": unit,
        "ratio": ratio,
        "higher_is_better": higher_is_better,
        "rounds": [{"ours": o[0], "theirs": t[0], "ratio": r} for o, t, r in zip(ours, theirs, ratios, strict=True)],
        "ours_peak_mb": max(o[1] for o in ours),
        "theirs_peak_mb": max(t[1] for t in theirs),
        "target": TARGETS.get(name),
        "met": ratio >= TARGETS[name] if name in TARGETS else None,
    }


def table(result: dict[str, Any]) -> str:
    """The comparisons as a Markdown table, under a line naming the machine and the commit."""
    m, commit = result["machine"], result["commit"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores"
        + (f", {m['gpu']}" if m["gpu"] else "")
        + f"; allocator {m.get('allocator', '?')}; commit {commit['hash']}"
        + (" (with uncommitted changes)." if commit["dirty"] else "."),
        "",
        "| comparison | selfsup | theirs | unit | ratio | target | precision | peak MB selfsup / theirs |",
        "|---|---:|---:|---|---:|---:|---|---:|",
    ]
    for c in result["comparisons"]:
        target = f">= {c['target']}" + (" met" if c["met"] else " not met") if c["target"] else "-"
        lines.append(
            f"| {c['name']} | {c['ours']:,.1f} | {c['theirs']:,.1f} | {c['unit']} | {c['ratio']:.2f}x | "
            f"{target} | {c.get('precision', '-')} | {c['ours_peak_mb']:,.0f} / {c['theirs_peak_mb']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict[str, Any]:
    """Run the rounds and the probe, print the table and write it and the JSON."""
    ap = parser(__name__, __doc__)
    ap.add_argument("--quick", action="store_true", help="fewer images and steps: under 5 minutes on 2 cores")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of each measurement")
    ap.add_argument("--images", type=int, default=4096, help="images of the data_pipeline comparison")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40, help="training steps of each simclr_step run")
    ap.add_argument("--width", type=int, default=32, help="of the small CNN")
    ap.add_argument("--hidden", type=int, default=512, help="of the projection head")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="lightly's DataLoader workers")
    ap.add_argument("--probe-images", type=int, default=2000, help="training images of the probe comparison")
    ap.add_argument("--probe-epochs", type=int, default=30)
    ap.add_argument("--probe-backbone", default="resnet18")
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument(
        "--precision",
        default=fast_precision("cpu"),
        help="of both sides' steps; default: bf16-mixed where the CPU has bf16 instructions, else 32-true",
    )
    ap.add_argument("--skip-fp32", action="store_true", help="no fp32 steps beside those at --precision")
    ap.add_argument("--json", default="runs/bench/bench.json")
    ap.add_argument("--markdown", default="runs/bench/bench.md")
    args = ap.parse_args(argv)
    # As the selfsup command does; one process, so lightly's side (and its forked workers) too.
    allocator = "glibc, freed blocks kept" if keep_freed_memory() else "as the system has it"
    if args.quick:
        # Five short rounds rather than one long: this machine's speed drifts by 10-30% over
        # minutes, and the median of five paired ratios is steadier than one. No fp32 rows.
        args.images, args.steps, args.rounds, args.skip_fp32 = 2048, 16, 5, True
        args.probe_images, args.probe_epochs = 512, 30  # full batches of 256: each epoch sees every image
    train = load_sample_split("train", 32)
    images = train.images[: args.images]
    pils = pil_images(train.images)
    # The steps at the machine's fast precision (both sides alike), and in fp32 beside it.
    precisions = [args.precision] + (["32-true"] if args.precision != "32-true" and not args.skip_fp32 else [])
    runs = ["views", "cviews", "lviews"] + [f"{k}@{p}" for p in precisions for k in ("steps", "lsteps", "bare")]
    repeats = max(1, 6144 // args.images)  # about half a second of views per measurement
    rounds: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    dm = ImageDataModule(batch_size=args.batch_size, image_size=32)
    dm.setup()
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            # Without blur, as lightly's transform is set up (gaussian_blur=0).
            # Every other round lightly goes first, so that neither side always has the later slot.
            lightly_first = r % 2 == 1
            if lightly_first:
                rounds["lviews"].append(measure(lambda: lightly_views_per_core(pils[: max(256, args.images // 4)])))
            rounds["views"].append(measure(lambda: views_rate(images, 32, 512, repeats, blur=False)))
            if not lightly_first:
                rounds["lviews"].append(measure(lambda: lightly_views_per_core(pils[: max(256, args.images // 4)])))
            rounds["cviews"].append(measure(lambda: views_rate(images, 32, 512, repeats, blur=False, compile=True)))
            line = (
                f"round {r + 1}: views {rounds['views'][-1][0]:,.0f} (compiled {rounds['cviews'][-1][0]:,.0f}) vs "
                f"lightly {rounds['lviews'][-1][0]:,.0f} images/s per core"
            )
            for p in precisions:
                # Ours before and after the bare step it is held against (their mean counts: the
                # machine's speed drifts within a round too); lightly before or after the three.
                if lightly_first:
                    rounds[f"lsteps@{p}"].append(measure(lambda: lightly_steps(args, pils, folder, p)))  # noqa: B023
                first = measure(lambda: ours_steps(args, folder, p, dm))  # noqa: B023
                rounds[f"bare@{p}"].append(measure(lambda: bare_steps(args, p)))  # noqa: B023
                second = measure(lambda: ours_steps(args, folder, p, dm))  # noqa: B023
                rounds[f"steps@{p}"].append(((first[0] + second[0]) / 2, max(first[1], second[1])))
                if not lightly_first:
                    rounds[f"lsteps@{p}"].append(measure(lambda: lightly_steps(args, pils, folder, p)))  # noqa: B023
                line += (
                    f"; steps ({p}) {rounds[f'steps@{p}'][-1][0]:,.0f} vs lightly {rounds[f'lsteps@{p}'][-1][0]:,.0f}"
                    f" vs bare {rounds[f'bare@{p}'][-1][0]:,.0f} images/s"
                )
            print(line, flush=True)
        comparisons = [
            comparison("data_pipeline", rounds["views"], rounds["lviews"], "images/s per core"),
            comparison("data_pipeline_compiled", rounds["cviews"], rounds["lviews"], "images/s per core"),
        ]
        for p in precisions:
            suffix = "" if p == args.precision else "_fp32"
            for name, theirs in (("simclr_step", "lsteps"), ("simclr_step_vs_compute", "bare")):
                c = comparison(name + suffix, rounds[f"steps@{p}"], rounds[f"{theirs}@{p}"], "images/s")
                comparisons.append({**c, "precision": p})
        if not args.skip_probe:
            dm = ImageDataModule(
                batch_size=256,
                image_size=32,
                max_train_images=args.probe_images,
                max_eval_images=min(1000, args.probe_images // 2),
            )
            dm.setup()
            spec: dict[str, Any] = {"backbone": {"name": args.probe_backbone, "cifar_stem": True, "width": args.width}}
            # fp32, the probe's default: its time is the backbone's passes, as many as the classic
            # probe has epochs against one. Ours runs before and after the classic probe (minutes,
            # over which this machine's speed drifts) and counts with the mean of the two.
            # One untimed epoch first: the first passes of a network pay for oneDNN's kernels and the
            # heap's first pages (the first timed run was 1.4x the second), whichever side came first.
            run_probe(dm, 1, Path(folder), search=SEARCH, **spec)
            ours = measure(lambda: run_probe(dm, args.probe_epochs, Path(folder), search=SEARCH, **spec))
            chosen = OptimizerSpec(name="adam", lr=ours[0]["lr"], weight_decay=ours[0]["weight_decay"])
            classic = measure(
                lambda: run_probe(
                    dm, args.probe_epochs, Path(folder), augment=True, cache_features=False, optimizer=chosen, **spec
                )
            )
            again = measure(lambda: run_probe(dm, args.probe_epochs, Path(folder), search=SEARCH, **spec))
            seconds = (ours[0]["seconds"] + again[0]["seconds"]) / 2
            print(
                f"linear probe: {ours[0]['seconds']:.1f} s and {again[0]['seconds']:.1f} s vs classic "
                f"{classic[0]['seconds']:.1f} s",
                flush=True,
            )
            c = comparison(
                "linear_probe",
                [(seconds, max(ours[1], again[1]))],
                [(classic[0]["seconds"], classic[1])],
                "s",
                higher_is_better=False,
            )
            c["top1"] = {"ours": ours[0]["top1"], "theirs": classic[0]["top1"]}
            comparisons.append(c)
    result = write_json(
        args.json,
        {
            "machine": {"allocator": allocator, "compile_fell_back": sorted(FELL_BACK)},
            "args": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
            "comparisons": comparisons,
        },
    )
    md = table(result)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(md)
    print(md, flush=True)
    return result
