"""Time to accuracy: SimCLR on CIFAR-10, kNN accuracy against wall-clock time.

    python -m benchmarks speedrun --root /path/to/cifar10 [--minutes 10] [--target 0.9]
    python -m benchmarks speedrun --toy     # the embedded sample, a small CNN: a CPU smoke test

SimCLR (ResNet-18 with the CIFAR stem, 2-layer projection head, NT-Xent over the batch) on all
training images, with selfsup's own parts (``SimCLR``'s backbone, projector, loss and batched
views) in a lean loop built for one GPU: the whole uint8 training set resident on the device
(CIFAR-10 is 150 MB), views made there, bf16 autocast, channels_last, optional
``torch.compile``, a foreach optimizer step, and no logging inside the step (the loss is read
only at evaluation; the color jitter's per-image operation order still finds its groups with
``nonzero``, a synchronization per operation). Every ``--eval-every`` seconds the kNN classifier
(k = 200, t = 0.1, the whole training split as the bank, every test image) is measured; the run
stops at ``--target``, at ``--minutes`` or after ``--max-epochs``. Writes the curve as JSON and
PNG and where the time went (views, forward and loss, backward, optimizer step, evaluation;
the first steps are timed with synchronization to split them); the JSON is stamped with the machine
and the commit.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, parser, sync, write_json
from selfsup.data import ImageDataModule
from selfsup.evaluation import OnlineSpec
from selfsup.evaluation.knn import knn_scores
from selfsup.methods import SimCLR
from selfsup.models.backbones import BackboneSpec
from selfsup.optim import OptimizerSpec
from selfsup.optim.schedules import lr_factor, scale_lr

#: What ``--toy`` changes: the embedded sample, a small CNN, a minute on a CPU (flags given still win).
TOY = {
    "backbone": "small_cnn",
    "batch_size": 64,
    "minutes": 1.0,
    "max_epochs": 2,
    "max_train_images": 512,
    "max_eval_images": 256,
    "eval_every": 5.0,
    "proj_hidden": 64,
}


@torch.no_grad()
def knn_top1(
    model: SimCLR,
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    amp: bool,
    batch: int = 1024,
) -> float:
    """kNN top-1 (k = 200, t = 0.1) of the backbone's features: the bank is every training image."""
    model.eval()
    with torch.autocast(train.device.type, dtype=torch.bfloat16, enabled=amp):
        bank = torch.cat([model.embed(train[i : i + batch]).float() for i in range(0, len(train), batch)])
        query = torch.cat([model.embed(test[i : i + batch]).float() for i in range(0, len(test), batch)])
    model.train()
    scores = knn_scores(query, bank, train_labels, num_classes, k=min(200, len(bank)), temperature=0.1)
    return float((scores.argmax(1) == test_labels).float().mean())


def curve_png(points: list[dict[str, float]], target: float, path: Path) -> Path | None:
    """kNN top-1 against minutes as a PNG at ``path``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p["seconds"] / 60 for p in points], [100 * p["knn_top1"] for p in points], marker="o")
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("wall-clock minutes")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title("SimCLR on CIFAR-10: kNN accuracy against time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str]) -> dict[str, Any]:
    """Train until the target, the budget or the last epoch; print and write the curve."""
    ap = parser(__name__, __doc__)
    ap.add_argument(
        "--root", default=None, help="CIFAR-10 as an image folder with train/ and test/ (default: the embedded sample)"
    )
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget, evaluations included")
    ap.add_argument("--target", type=float, default=0.9, help="stop at this kNN top-1")
    ap.add_argument("--max-epochs", type=int, default=500)
    ap.add_argument("--epochs-for-schedule", type=int, default=100, help="length of the cosine schedule")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.06, help="SGD rate at 256 images per step (linear scaling)")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--width", type=int, default=32, help="of small_cnn")
    ap.add_argument("--proj-hidden", type=int, default=1024)
    ap.add_argument("--warmup-epochs", type=float, default=2.0)
    ap.add_argument("--eval-every", type=float, default=60.0, help="seconds between kNN evaluations")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 instead of bf16 autocast (CUDA only)")
    ap.add_argument("--timed-steps", type=int, default=20, help="steps timed phase by phase (with synchronization)")
    ap.add_argument("--max-train-images", type=int, default=None)
    ap.add_argument("--max-eval-images", type=int, default=None)
    ap.add_argument("--toy", action="store_true", help="the embedded sample, a small CNN, a minute on a CPU")
    ap.add_argument("--out", default="runs/speedrun", help="curve.json and curve.png go here")
    if ap.parse_known_args(argv)[0].toy:  # the toy run's defaults, under the flags given
        ap.set_defaults(**TOY)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = args.amp and device.type == "cuda"
    torch.manual_seed(0)
    t_start = time.perf_counter()

    dm = ImageDataModule(
        root=args.root,
        image_size=32,
        max_train_images=args.max_train_images,
        max_eval_images=args.max_eval_images,
        cache_min_images=10**9,
    )
    dm.setup()
    # The whole uint8 set on the device: no loader, no host-to-device copy per step.
    train, test = dm.train_set.images.to(device), dm.eval_set.images.to(device)
    ytrain, ytest = dm.train_set.labels.to(device), dm.eval_set.labels.to(device)
    n, classes = len(train), dm.num_classes
    b = min(args.batch_size, n)
    model = SimCLR(
        backbone=BackboneSpec(args.backbone, cifar_stem=True, width=args.width),
        proj_hidden=args.proj_hidden,
        proj_dim=128,
        temperature=args.temperature,
        online=OnlineSpec(enabled=False),
    ).to(device)
    net = torch.compile(model.backbone) if args.compile else model.backbone
    lr = scale_lr(args.lr, b, 256, "linear")
    opt = OptimizerSpec("sgd", lr=lr, weight_decay=args.weight_decay, momentum=0.9).build(
        [model.backbone, model.projector]
    )
    for g in opt.param_groups:  # one kernel per tensor group, not per parameter
        g["foreach"] = True
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = n // b
    total = args.epochs_for_schedule * steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch)
    setup_s = time.perf_counter() - t_start
    here = machine()
    print(
        f"speedrun: {n:,} training / {len(test):,} test images on {device} ({here['gpu'] or here['cpu']}), "
        f"{args.backbone}, batch {b}, lr {lr:.3g}, set-up {setup_s:.1f} s",
        flush=True,
    )

    phases = {"views": 0.0, "forward_loss": 0.0, "backward": 0.0, "optimizer": 0.0}
    timed = 0
    points: list[dict[str, float]] = []
    eval_s = 0.0
    step, epoch, next_eval = 0, 0, args.eval_every
    budget = 60 * args.minutes
    loss = torch.zeros((), device=device)

    def evaluate() -> float:
        nonlocal eval_s
        t0 = time.perf_counter()
        acc = knn_top1(model, train, ytrain, test, ytest, classes, amp)
        eval_s += time.perf_counter() - t0
        points.append(
            {
                "seconds": time.perf_counter() - t_start,
                "epoch": epoch,
                "step": step,
                "knn_top1": acc,
                "loss": float(loss.detach()),
            }
        )
        print(
            f"speedrun: {points[-1]['seconds']:.0f} s, epoch {epoch}, step {step}: kNN top-1 {100 * acc:.2f}%, "
            f"loss {float(loss.detach()):.3f}",
            flush=True,
        )
        return acc

    done = False
    while not done and epoch < args.max_epochs:
        perm = torch.randperm(n, device=device)
        for i in range(steps_per_epoch):
            f = lr_factor(step, total, warmup, "cosine")
            for g, base in zip(opt.param_groups, base_lrs, strict=True):
                g["lr"] = base * f
            clock = timed < args.timed_steps
            t0 = time.perf_counter()
            batch = train[perm[i * b : (i + 1) * b]]
            v0, v1 = model.views(batch)
            if clock:
                sync(device)
                t1 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                z = model.projector(net(torch.cat([v0, v1])))
            loss = model.criterion(*z.float().chunk(2))
            if clock:
                sync(device)
                t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clock:
                sync(device)
                t3 = time.perf_counter()
            opt.step()
            if clock:
                sync(device)
                t4 = time.perf_counter()
                for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    phases[key] += dt
                timed += 1
            step += 1
            if time.perf_counter() - t_start >= next_eval:
                next_eval = time.perf_counter() - t_start + args.eval_every
                if evaluate() >= args.target or time.perf_counter() - t_start >= budget:
                    done = True
                    break
            if time.perf_counter() - t_start >= budget:
                done = True
                break
        epoch += 1
    if not points or points[-1]["step"] != step:
        evaluate()
    wall = time.perf_counter() - t_start
    reached = next((p for p in points if p["knn_top1"] >= args.target), None)
    per_step = {k: v / max(1, timed) for k, v in phases.items()}
    step_s = sum(per_step.values())
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "train_images": n,
        "test_images": len(test),
        "steps": step,
        "epochs": step / max(1, steps_per_epoch),
        "wall_seconds": wall,
        "setup_seconds": setup_s,
        "evaluation_seconds": eval_s,
        "train_images_per_s": step * b / max(1e-9, wall - eval_s - setup_s),
        "seconds_per_step_by_phase": per_step,
        "share_by_phase": {k: v / step_s for k, v in per_step.items()} if step_s > 0 else {},
        "best_knn_top1": max(p["knn_top1"] for p in points),
        "seconds_to_target": reached["seconds"] if reached else None,
        "curve": points,
    }
    out = Path(args.out)
    result = write_json(out / "curve.json", result)
    png = curve_png(points, args.target, out / "curve.png")
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["share_by_phase"].items())
    said = (
        f"reached {100 * args.target:.0f}% at {reached['seconds']:.0f} s"
        if reached
        else f"best {100 * result['best_knn_top1']:.2f}% (target {100 * args.target:.0f}% not reached)"
    )
    print(
        f"speedrun: {said}; {step} steps ({result['epochs']:.1f} epochs) in {wall:.0f} s, "
        f"{result['train_images_per_s']:,.0f} training images/s; evaluation {eval_s:.0f} s; step time: {shares}; "
        f"curve in {out / 'curve.json'}" + (f" and {png}" if png else ""),
        flush=True,
    )
    if not math.isfinite(float(loss.detach())):
        raise SystemExit("speedrun: the loss is not finite; lower --lr")
    return result
