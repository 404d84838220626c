"""Decoding throughput and the memory of a DDP job, measured side by side.

1. Throughput (images/s): the former decoder (a thread pool, every JPEG decoded at full size)
   against ``selfsup.data.decode.decode_files`` (worker processes, JPEG draft decoding), on the
   same files in the same process, best of ``--rounds``.
2. Memory: ``selfsup fit`` (SimCLR, a few steps) on the same folder with 1 process and with 2
   DDP processes (gloo), each with an empty decode cache; the peak of the summed proportional set
   size (PSS: shared pages split between the processes that map them) of the whole process tree,
   sampled every 0.1 s, and the peak of the summed resident sizes (RSS).

    python scripts/bench_decode.py --root ../shared/data/cifar10 --image-size 32 --images 20000
    python scripts/bench_decode.py --root ../shared/data/imagenette160 --image-size 64 --images 5000 --no-memory
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from selfsup.data.decode import available_cores, decode_files  # noqa: E402
from selfsup.data.sources import scan_folder  # noqa: E402


def former_decode(path: Path, size: int) -> np.ndarray:
    """What selfsup did before: full-size decode, convert, bicubic resize, centre crop."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
        left, top = (nw - size) // 2, (nh - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)


def former_decode_many(files: list[Path], size: int, workers: int) -> np.ndarray:
    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(lambda f: former_decode(f, size), files)))


def best_rate(fn, n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def tree_memory(pid: int) -> tuple[int, int]:
    """(summed PSS, summed RSS) in bytes of ``pid`` and all its descendants."""
    pids, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        pids += map(int, kids)
        frontier += map(int, kids)
    pss = rss = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return pss, rss


def peak_memory(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, int, float, int]:
    """Run a command; return (peak PSS, peak RSS, seconds, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        pss, rss = tree_memory(proc.pid)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.1)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        print(out[-3000:])
    return peak_pss, peak_rss, time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="an image folder (any layout)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=10000, help="files decoded in the throughput test")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the 1- against 2-process memory run")
    ap.add_argument("--no-decode", action="store_true", help="skip the throughput test")
    ap.add_argument("--steps", type=int, default=5, help="training steps of the memory runs")
    ap.add_argument("--src", default=str(REPO / "src"),
                    help="the selfsup sources the memory runs use (another checkout's src/ for a before/after)")
    a = ap.parse_args()

    scan = scan_folder(Path(a.root) / "train" if (Path(a.root) / "train").is_dir() else Path(a.root))
    # Spread over the classes: a folder is stored class by class.
    files = [scan.files[i] for i in np.linspace(0, len(scan.files) - 1, min(a.images, len(scan.files))).astype(int)]
    for f in files:  # page cache warm for both: the disk is not what is measured
        f.read_bytes()
    cores = available_cores()
    print(f"{len(files)} files of {a.root}, {a.image_size} px, {cores} cores")
    if not a.no_decode:
        decode_rates(files, a.image_size, cores, a.rounds)
    if a.no_memory:
        return
    memory_runs(a)


def decode_rates(files: list[Path], size: int, cores: int, rounds: int) -> None:
    old = best_rate(lambda: former_decode_many(files, size, min(8, cores)), len(files), rounds)
    new = best_rate(lambda: decode_files(files, size, cores), len(files), rounds)
    one = best_rate(lambda: decode_files(files, size, 1), len(files), rounds)
    print(f"decode: former (threads, full-size JPEG decode) {old:,.0f} images/s")
    print(f"decode: selfsup, 1 process                      {one:,.0f} images/s")
    print(f"decode: selfsup, {cores} processes                    {new:,.0f} images/s ({new / old:.2f}x the former)")


def memory_runs(a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, trainer in (("1 process", "cpu.yaml"), ("2 processes (DDP, gloo)", "ddp_cpu.yaml")):
            cache = Path(tmp) / f"cache-{trainer}"
            env = {**os.environ, "SELFSUP_CACHE": str(cache), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": a.src}
            cmd = [sys.executable, "-m", "selfsup.cli", "fit", "--config", str(REPO / "configs/simclr/cifar10.yaml"),
                   "--config", str(REPO / "configs/trainer" / trainer), "--model.init_args.backbone.name", "small_cnn",
                   "--model.init_args.backbone.width", "8", "--model.init_args.proj_hidden", "16",
                   "--model.init_args.online.enabled", "false", "--data.root", str(Path(a.root).resolve()),
                   "--data.image_size", str(a.image_size), "--data.batch_size", "32",
                   "--trainer.max_steps", str(a.steps), "--trainer.limit_val_batches", "1",
                   "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
                   "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(Path(tmp) / trainer)]
            pss, rss, secs, code = peak_memory(cmd, env, Path(tmp))
            if code != 0:
                raise SystemExit(f"{name}: exit {code}")
            results[name] = pss
            print(f"memory: {name:24s} peak PSS {pss / 2**30:.2f} GiB, peak RSS sum {rss / 2**30:.2f} GiB, {secs:.0f} s")
        one_p, two_p = results.values()
        print(f"memory: 2 processes / 1 process = {two_p / one_p:.2f}x (PSS)")


if __name__ == "__main__":
    main()
