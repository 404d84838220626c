"""Streaming LitData: peak memory as the collection grows, loader speed against torchvision.

Streaming is measured against decoding everything into memory, and against the usual torchvision loader.

    python -m benchmarks stream --src /path/to/imagenette160 [--images 2000] [--steps 30]
                                [--workers 2] [--batches 40] [--json FILE]
    python -m benchmarks stream --src DIR --quick   # 300 images, a few steps: a minute

1. **Peak memory, 1x against 4x the images.** ``--images`` and 4 x ``--images`` JPEGs of
   ``--src`` are written with ``selfsup data optimize``; SimCLR (small CNN, views of 96 px)
   trains the same ``--steps`` steps on each, once streaming (``data.source stream``) and once
   from memory (``data.source folder``, decoded at 160 px), each in its own process: its peak
   resident memory (``ru_maxrss`` of the training process) and, apart, the largest peak of its
   child processes (loader workers, decoding processes).
2. **Loader throughput.** Training batches of two 224-px views per image from the same JPEGs, in
   DataLoaders with ``--workers`` processes, timed side by side in this process (rounds
   alternate, the best round of each counts):
   - ``torchvision``: ``ImageFolder`` with PIL ``RandomResizedCrop(224)``, flip, ``ColorJitter``
     (0.4, 0.4, 0.4, 0.1, p 0.8), grayscale (p 0.2), ``ToTensor``, ``Normalize``, twice per
     image (SimCLR's views, as lightly and solo-learn build them: ``augment``'s per-sample pipeline);
   - ``selfsup``: the streamed dataset with each image's two crops cut from the full image in
     the workers (``CropViews``: one decode, JPEG draft scaling where the crops allow), uint8;
     color, grayscale and normalization then run batched on the training device;
   - ``selfsup + color on this CPU``: the same, with the batched color steps in the main
     process, for machines without a GPU.
   images/s per worker process = images/s / ``--workers``.
3. With a GPU: JPEG decoding on the device (torchvision's batched ``decode_jpeg(device="cuda")``)
   against one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.augment import TwoViews, per_sample_transform
from benchmarks.common import REPO, parser, quiet_trainer, seconds_per_call, sync, torch_threads, write_json


# -- collections -----------------------------------------------------------------------------
def link_collection(src: Path, dest: Path, n: int) -> Path:
    """``n`` image files of ``src`` (spread over its classes, sorted) as links under ``dest``
    with the same class folders: the same JPEG bytes without copying them."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(files) < n:
        raise SystemExit(f"{src} holds {len(files)} images; {n} are needed (lower --images)")
    step = len(files) / n
    for k in range(n):
        f = files[int(k * step)]
        out = dest / f.parent.name / f.name
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.exists():
            out.symlink_to(f.resolve())
    return dest


# -- 1. peak memory (one process per run) ----------------------------------------------------
def memory_child(source: str, root: str, steps: int, batch: int, workers: int) -> dict[str, Any]:
    """Train SimCLR ``steps`` steps and report this process's peak memory."""
    import lightning as L

    from selfsup.data import ImageDataModule
    from selfsup.evaluation.online import OnlineSpec
    from selfsup.methods import SimCLR

    L.seed_everything(0, verbose=False)
    stream = source == "stream"
    dm = ImageDataModule(
        root=root,
        source=source,
        image_size=160,
        batch_size=batch,
        num_workers=workers,
        val_fraction=0.1,
        cache_min_images=10**9,
        decode_workers=1,
    )
    model = SimCLR(
        backbone={"name": "small_cnn", "width": 32},
        proj_hidden=128,
        views={"size": 96},
        optimizer={"name": "adam", "lr": 1e-3},
        online=OnlineSpec(enabled=False),
    )
    trainer = quiet_trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(Path(root).parent / "runs"),
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "source": source,
        "images": len(dm.train_set),
        "steps": int(trainer.global_step),
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": own,
        "peak_worker_rss_mb": kids,
        "streamed": stream,
    }


def run_memory(source: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`memory_child` in a process of its own (a process's peak is its whole life's)."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks",
        "stream",
        "--child-memory",
        source,
        str(root.resolve()),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)  # REPO: where -m finds benchmarks
    if p.returncode != 0:
        raise SystemExit(f"memory run failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- 2. loader throughput --------------------------------------------------------------------
def torchvision_loader(folder: Path, size: int, batch: int, workers: int) -> torch.utils.data.DataLoader:
    """The usual SimCLR loader: ``ImageFolder`` and the per-sample torchvision views in workers."""
    from torchvision import datasets

    ds = datasets.ImageFolder(str(folder), transform=TwoViews(per_sample_transform(size)))
    return torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0
    )


def selfsup_loader(optimized: Path, size: int, batch: int, workers: int) -> torch.utils.data.DataLoader:
    """The streamed dataset, each image's two crops cut in the workers (uint8; color comes later, batched)."""
    from selfsup.data.litdata.dataset import StreamedDataset, TrainedPositionLoader
    from selfsup.data.litdata.samples import CropViews

    ds = StreamedDataset(str(optimized / "train"), CropViews(2, size), shuffle=True, seed=0, drop_last=True)
    return TrainedPositionLoader(ds, batch_size=batch, num_workers=workers, drop_last=True)


def time_loader(
    loader: Any, batches: int, finish: Callable[[torch.Tensor], torch.Tensor] | None = None, warmup: int = 3
) -> float:
    """Images/s over ``batches`` batches after ``warmup`` (workers started, first chunks read)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        if finish is not None:
            v = b["views"]
            finish(v[:, 0]), finish(v[:, 1])
        n += len(b["index"]) if isinstance(b, dict) else len(b[1])
    return n / (time.perf_counter() - t0)


def run_throughput(folder: Path, optimized: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Both loaders (and ours with the color steps here) in alternating rounds; the best round of each."""
    from selfsup.data.views import SimCLRViews

    finish = SimCLRViews(image_size=None, blur=False).finish
    loaders = {
        "torchvision": torchvision_loader(folder, 224, args.batch_size, args.workers),
        "selfsup": selfsup_loader(optimized, 224, args.batch_size, args.workers),
    }
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for name in ("torchvision", "selfsup", "selfsup + color on this CPU"):
            loader = loaders["selfsup" if name.startswith("selfsup") else name]
            with torch.no_grad():
                rate = time_loader(loader, args.batches, finish if "color" in name else None)
            best[name] = max(best.get(name, 0.0), rate)
            print(
                f"throughput round {r + 1}: {name}: {rate:,.0f} images/s ({rate / args.workers:,.0f} per worker)",
                flush=True,
            )
    base = best["torchvision"]
    return {
        name: {"images_per_s": v, "images_per_s_per_worker": v / args.workers, "ratio": v / base}
        for name, v in best.items()
    }


# -- 3. decoding on the GPU ------------------------------------------------------------------
def gpu_decode(folder: Path, n: int = 2048, batch: int = 256) -> dict[str, Any] | None:
    """Images/s of batched nvJPEG decoding against one CPU thread; None without a GPU."""
    if not torch.cuda.is_available():
        return None
    from torchvision.io import decode_jpeg, read_file

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:n]
    data = [read_file(str(f)) for f in files]
    decode_jpeg(data[:batch], device="cuda")  # warm up nvJPEG
    sync("cuda")

    def on_gpu() -> None:
        for i in range(0, len(data), batch):
            decode_jpeg(data[i : i + batch], device="cuda")

    gpu = len(data) / seconds_per_call(on_gpu, device="cuda")
    with torch_threads(1):
        cpu = 512 / seconds_per_call(lambda: [decode_jpeg(d) for d in data[:512]])
    return {"images": len(data), "gpu_images_per_s": gpu, "cpu_one_thread_images_per_s": cpu, "ratio": gpu / cpu}


def main(argv: list[str]) -> dict[str, Any]:
    """Write the collections, run the memory runs and the loaders, print and write the figures."""
    ap = parser(__name__, __doc__)
    ap.add_argument("--src", default=None, help="a folder of JPEGs (class folders or not)")
    ap.add_argument("--images", type=int, default=2000, help="the 1x collection (4x is four times this)")
    ap.add_argument("--steps", type=int, default=30, help="training steps of each memory run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    ap.add_argument("--batches", type=int, default=40, help="timed batches per throughput round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="300 images, 8 steps, 8 batches")
    ap.add_argument("--work", default=None, help="where the collections are written (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--child-memory", nargs=2, metavar=("SOURCE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_memory:  # run_memory's process
        source, root = args.child_memory
        out = memory_child(source, root, args.steps, args.batch_size, args.workers)
        print(json.dumps(out))
        return out
    if args.src is None:
        ap.error("--src is required")
    if args.quick:
        args.images, args.steps, args.batches, args.batch_size = 300, 8, 8, 32
    from selfsup.data.litdata.write import optimize_folder

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_stream_"))
    src = Path(args.src).expanduser()
    results: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if k not in ("child_memory", "work", "json")},
    }
    memory: dict[str, Any] = {}
    for scale in (1, 4):
        folder = link_collection(src, work / f"images_{scale}x", scale * args.images)
        optimized = work / f"optimized_{scale}x"
        if not (optimized / "selfsup.json").exists():
            optimize_folder(folder, optimized, workers=args.workers)
        for source, root in (("stream", optimized), ("folder", folder)):
            m = run_memory(source, root, args)
            memory[f"{source}_{scale}x"] = m
            print(
                f"memory: {source:6s} {scale}x ({m['images']:,} training images, {m['steps']} steps): "
                f"peak {m['peak_rss_mb']:,.0f} MB (+ workers {m['peak_worker_rss_mb']:,.0f} MB), {m['seconds']:.0f} s",
                flush=True,
            )
    for source in ("stream", "folder"):
        memory[f"{source}_growth"] = memory[f"{source}_4x"]["peak_rss_mb"] / memory[f"{source}_1x"]["peak_rss_mb"]
    print(
        f"memory: peak at 4x / peak at 1x: streaming {memory['stream_growth']:.2f}x, "
        f"in memory {memory['folder_growth']:.2f}x",
        flush=True,
    )
    results["memory"] = memory
    results["throughput"] = run_throughput(work / "images_4x", work / "optimized_4x", args)
    t = results["throughput"]
    print(
        f"throughput: selfsup {t['selfsup']['images_per_s']:,.0f} images/s against torchvision "
        f"{t['torchvision']['images_per_s']:,.0f}: {t['selfsup']['ratio']:.2f}x "
        f"(with the color steps on this CPU: {t['selfsup + color on this CPU']['ratio']:.2f}x)",
        flush=True,
    )
    results["gpu_decode"] = gpu_decode(work / "images_4x")
    if results["gpu_decode"]:
        g = results["gpu_decode"]
        print(
            f"gpu decode: {g['gpu_images_per_s']:,.0f} images/s against {g['cpu_one_thread_images_per_s']:,.0f} "
            f"on one CPU thread ({g['ratio']:.1f}x)",
            flush=True,
        )
    results["comparisons"] = [
        {
            "name": "stream_loader",
            "ours": t["selfsup"]["images_per_s_per_worker"],
            "theirs": t["torchvision"]["images_per_s_per_worker"],
            "unit": "images/s per worker",
            "ratio": t["selfsup"]["ratio"],
        },
        {
            "name": "stream_peak_memory_4x_over_1x",
            "ours": memory["stream_growth"],
            "theirs": memory["folder_growth"],
            "unit": "ratio",
            "ratio": memory["folder_growth"] / memory["stream_growth"],
        },
    ]
    return write_json(args.json, results)
