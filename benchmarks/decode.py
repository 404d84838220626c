"""Decoding: throughput against the former decoder, memory of 2 DDP processes against 1.

1. Throughput (images/s): the former decoder (a thread pool, every JPEG decoded at full size)
   against ``selfsup.data.decode.decode_files`` (worker processes, JPEG draft decoding), on the
   same files in the same process, best of ``--rounds``.
2. Memory: ``selfsup fit`` (SimCLR, a few steps) on the same folder with 1 process and with 2
   DDP processes (gloo), each with an empty decode cache; the peak of the summed proportional set
   size (PSS: shared pages split between the processes that map them) of the whole process tree,
   sampled every 0.1 s, and the peak of the summed resident sizes (RSS).

    python -m benchmarks decode --root /path/to/cifar10 --image-size 32 --images 20000
    python -m benchmarks decode --root /path/to/imagenette160 --image-size 64 --images 5000 --no-memory
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import REPO, PeakMemory, parser, seconds_per_call, write_json
from selfsup.data.decode import available_cores, decode_files
from selfsup.data.folders import scan_folder


def former_decode(path: Path, size: int) -> np.ndarray:
    """What selfsup did before: full-size decode, convert, bicubic resize, center crop."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
        left, top = (nw - size) // 2, (nh - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def former_decode_many(files: list[Path], size: int, workers: int) -> np.ndarray:
    """:func:`former_decode` on a thread pool, as selfsup decoded a folder before."""
    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(lambda f: former_decode(f, size), files)))


def peak_memory(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, float, int]:
    """Run a command; return (peak PSS MB, peak RSS MB, seconds, exit code) of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakMemory(proc.pid, interval=0.1, pss=True) as m:
        out, _ = proc.communicate()  # read as it comes: a full pipe would stall the run
    if proc.returncode != 0:
        print(out[-3000:])
    return m.peak_pss_mb, m.peak_rss_mb, time.perf_counter() - t0, proc.returncode


def main(argv: list[str]) -> dict[str, Any]:
    """Throughput on a sample of the folder's files, then the two memory runs; print and write the figures."""
    ap = parser(__name__, __doc__)
    ap.add_argument("--root", required=True, help="an image folder (any layout)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=10000, help="files decoded in the throughput test")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the 1- against 2-process memory run")
    ap.add_argument("--no-decode", action="store_true", help="skip the throughput test")
    ap.add_argument("--steps", type=int, default=5, help="training steps of the memory runs")
    ap.add_argument(
        "--src",
        default=str(REPO / "src"),
        help="the selfsup sources the memory runs use (another checkout's src/ for a before/after)",
    )
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args(argv)

    scan = scan_folder(Path(a.root) / "train" if (Path(a.root) / "train").is_dir() else Path(a.root))
    # Spread over the classes: a folder is stored class by class.
    files = [scan.files[i] for i in np.linspace(0, len(scan.files) - 1, min(a.images, len(scan.files))).astype(int)]
    for f in files:  # page cache warm for both: the disk is not what is measured
        f.read_bytes()
    cores = available_cores()
    print(f"{len(files)} files of {a.root}, {a.image_size} px, {cores} cores")
    result: dict[str, Any] = {"args": {k: v for k, v in vars(a).items() if k != "json"}, "files": len(files)}
    if not a.no_decode:
        result["decode_images_per_s"] = decode_rates(files, a.image_size, cores, a.rounds)
    if not a.no_memory:
        result["memory"] = memory_runs(a)
    return write_json(a.json, result)


def decode_rates(files: list[Path], size: int, cores: int, rounds: int) -> dict[str, float]:
    """Images/s of the former decoder and of selfsup's on 1 and on all cores, best of ``rounds``."""

    def rate(fn: Callable[[], object]) -> float:
        return len(files) / seconds_per_call(fn, rounds=rounds)

    old = rate(lambda: former_decode_many(files, size, min(8, cores)))
    new = rate(lambda: decode_files(files, size, cores))
    one = rate(lambda: decode_files(files, size, 1))
    print(f"decode: former (threads, full-size JPEG decode) {old:,.0f} images/s")
    print(f"decode: selfsup, 1 process                      {one:,.0f} images/s")
    print(f"decode: selfsup, {cores} processes                    {new:,.0f} images/s ({new / old:.2f}x the former)")
    return {"former": old, "selfsup_1_process": one, f"selfsup_{cores}_processes": new, "ratio": new / old}


def memory_runs(a: argparse.Namespace) -> dict[str, Any]:
    """``selfsup fit`` with 1 and with 2 DDP processes, each in a fresh decode cache: their peak PSS and RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[str, Any] = {}
        for name, trainer in (("1 process", "cpu.yaml"), ("2 processes (DDP, gloo)", "ddp_cpu.yaml")):
            cache = Path(tmp) / f"cache-{trainer}"
            env = {
                **os.environ,
                "SELFSUP_CACHE": str(cache),
                "WANDB_MODE": "disabled",
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": a.src,
            }
            cmd = [
                sys.executable,
                "-m",
                "selfsup.cli",
                "fit",
                "--config",
                str(REPO / "configs/simclr/cifar10.yaml"),
                "--config",
                str(REPO / "configs/trainer" / trainer),
                "--model.init_args.backbone.name",
                "small_cnn",
                "--model.init_args.backbone.width",
                "8",
                "--model.init_args.proj_hidden",
                "16",
                "--model.init_args.online.enabled",
                "false",
                "--data.root",
                str(Path(a.root).resolve()),
                "--data.image_size",
                str(a.image_size),
                "--data.batch_size",
                "32",
                "--trainer.max_steps",
                str(a.steps),
                "--trainer.limit_val_batches",
                "1",
                "--trainer.logger",
                "false",
                "--trainer.enable_checkpointing",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.default_root_dir",
                str(Path(tmp) / trainer),
            ]
            pss, rss, secs, code = peak_memory(cmd, env, Path(tmp))
            if code != 0:
                raise SystemExit(f"{name}: exit {code}")
            results[name] = {"peak_pss_mb": pss, "peak_rss_mb": rss, "seconds": secs}
            print(f"memory: {name:24s} peak PSS {pss / 1024:.2f} GiB, peak RSS sum {rss / 1024:.2f} GiB, {secs:.0f} s")
        one_p, two_p = (r["peak_pss_mb"] for r in results.values())
        results["pss_ratio"] = two_p / one_p
        print(f"memory: 2 processes / 1 process = {two_p / one_p:.2f}x (PSS)")
    return results
