"""Soak test of resume: one run killed (SIGKILL, the whole process group) at several random
moments and run again each time must end bitwise equal to a run that never stopped.

    python scripts/soak_resume.py [--kills 5] [--seed 0] [--out runs/soak] [-- EXTRA selfsup fit ARGS]

The run is SimCLR with the small CNN on the embedded CIFAR-10 sample (1,200 images, batch 100,
6 epochs: 72 steps), checkpointed every 5 steps and at every epoch end. Each kill comes (seeded)
a random moment after the run saved a checkpoint at or past a random step, so the kills land
anywhere: in a step, in validation, while a checkpoint is written. Prints one line per kill (when,
which checkpoint was on disk) and the comparison of weights, optimizer state and BatchNorm
statistics; exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

FIT = [
    *("fit", "--config", "configs/trainer/cpu.yaml", "--config", "configs/simclr/cifar10.yaml"),
    *("--model.init_args.backbone.name", "small_cnn", "--model.init_args.optimizer.name", "adam"),
    *("--model.init_args.optimizer.lr", "0.002", "--model.init_args.online.knn_every", "2"),
    *("--data.max_train_images", "1200", "--data.max_eval_images", "200", "--data.batch_size", "100"),
    *("--warmup.warmup_epochs", "1", "--trainer.max_epochs", "6", "--checkpoint.every_n_steps", "5"),
    *("--trainer.enable_progress_bar", "false", "--trainer.logger", "false"),
]


def start(folder: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "selfsup.cli", *FIT, *extra, "--trainer.default_root_dir", str(folder)]
    # Its own process group: a kill takes the whole job, as a scheduler's does.
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def finish(p: subprocess.Popen) -> None:
    _, err = p.communicate()
    if p.returncode != 0:
        sys.exit(f"soak: the run failed (exit {p.returncode}):\n{err.decode()[-3000:]}")


def saved_step(folder: Path) -> int | None:
    ckpt = folder / "checkpoints" / "last.ckpt"
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]) if ckpt.is_file() else None


def differences(a: Path, b: Path) -> list[str]:
    """The tensors of two checkpoints that are not bitwise equal (weights, buffers, optimizer)."""
    ca, cb = (torch.load(p / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for p in (a, b))
    out = [k for k in ca["state_dict"] if not torch.equal(ca["state_dict"][k], cb["state_dict"][k])]
    for (i, sa), (_, sb) in zip(
        ca["optimizer_states"][0]["state"].items(), cb["optimizer_states"][0]["state"].items(), strict=True
    ):
        out += [
            f"optimizer[{i}].{k}" for k, v in sa.items() if isinstance(v, torch.Tensor) and not torch.equal(v, sb[k])
        ]
    if ca["global_step"] != cb["global_step"]:
        out.append(f"global_step {ca['global_step']} != {cb['global_step']}")
    return out


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/soak")
    ap.add_argument("--steps", default="", help="kill after these saved steps (comma-separated) instead of random ones")
    a = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    reference, killed = out / "reference", out / "killed"

    t0 = time.time()
    finish(start(reference, extra))
    duration = time.time() - t0
    print(f"soak: the uninterrupted run took {duration:.0f} s, step {saved_step(reference)}", flush=True)

    rng = random.Random(a.seed)
    total = saved_step(reference) or 1
    # Each kill waits until the run has saved a checkpoint at or past a random step, then a random
    # moment more (in a step, in validation, or while the next checkpoint is written).
    targets = sorted(rng.sample(range(3, total - 3), a.kills))
    if a.steps:
        targets = [int(x) for x in a.steps.split(",")]
    kills = 0
    for i, target in enumerate(targets, 1):
        p = start(killed, extra)
        while (saved_step(killed) or 0) < target and p.poll() is None:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 2.0) if not a.steps else 0.0)
        if p.poll() is not None:
            print(f"soak: kill {i}: the run had finished", flush=True)
            finish(p)
            break
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
        print(f"soak: kill {i} once step {target} was saved; last.ckpt on disk: step {saved_step(killed)}", flush=True)
    finish(start(killed, extra))
    different = differences(reference, killed)
    if different:
        print(f"soak: DIFFERENT from the uninterrupted run: {', '.join(different[:8])}")
        sys.exit(1)
    print(
        f"soak: {a.kills} kills, then the same command: bitwise equal to the uninterrupted run "
        f"(weights, BatchNorm statistics, optimizer state; step {saved_step(killed)})"
    )


if __name__ == "__main__":
    main()
