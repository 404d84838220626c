"""Runs that survive: killed at several moments and re-run, they end where an uninterrupted run
ends, bit for bit on the CPU; cluster signals leave checkpoints; guards stop or warn in words."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_run_files import mount_tmpfs

from resume_script import run_forked, start
from selfsup.callbacks.guards import CollapseWatch
from selfsup.data import ImageDataModule
from selfsup.evaluation.online import OnlineSpec
from selfsup.methods import SimCLR
from selfsup.models import BackboneSpec

from conftest import SMALL_SIMCLR

REPO = Path(__file__).resolve().parents[2]
STEPS = 14  # 2 epochs of 7 batches (120 images, batch 16)


def fit_args(images: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        *SMALL_SIMCLR,
        "--model.init_args.proj_hidden",
        "16",
        "--model.init_args.online.knn_every",
        "1",
        "--data.root",
        str(images),
        "--data.batch_size",
        "16",
        "--trainer.max_epochs",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--checkpoint.every_n_steps",
        "2",
        "--trainer.default_root_dir",
        str(run_dir),
        # No W&B: its service takes seconds to start in every process (its resume: test_tracking.py).
        "--trainer.logger",
        "false",
        *extra,
    ]


def run(stop: str, record: Path, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``selfsup ARGS`` in a process (a session) of its own that stops as ``stop`` says
    (tests/resume_script.py), forked from a server that imported selfsup once: the same code, 4 s
    less each; under DDP (``--trainer.strategy ddp``) 2 processes, started as torchrun does."""
    # Each process its own W&B service, as on a cluster: one inherited from this test process
    # would still hold the killed process's run open.
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "WANDB_MODE": "offline", **(env or {})}
    folder = Path(f"{record}.{stop.replace(':', '_').replace('@', '_')}")
    return run_forked(stop, record, args, env, folder, ranks=2 if "ddp" in args else 1)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def steps_by_process(record: Path) -> list[int]:
    """How many training steps each process trained, in order."""
    counts: dict[str, int] = {}
    for line in record.read_text().splitlines():
        pid = line.split()[0]
        counts[pid] = counts.get(pid, 0) + 1
    return list(counts.values())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    from conftest import write_image_folder

    base = tmp_path_factory.mktemp("resume")
    images = write_image_folder(base / "images", {"train": 40, "val": 10})
    p = run("none:0", base / "record", fit_args(images, base / "reference"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert steps_by_process(base / "record") == [STEPS]
    # Quiet, useful output: one line to start, one to end; no advertising, no deprecation notices.
    said = p.stdout + p.stderr
    assert "💡" not in said and "Tip:" not in said and "deprecat" not in said.lower()
    assert "selfsup fit: SimCLR on " in p.stdout and "global batch 16, run folder " in p.stdout
    assert "selfsup fit: done, epoch 2, step 14" in p.stdout and "val/knn_top1" in p.stdout
    return images, weights(base / "reference")


@pytest.mark.parametrize(
    ("stop", "saved"),
    [("save:6", 4), ("write:6", 4)],
    ids=["checkpoint-begun", "checkpoint-half-written"],
)
def test_killed_while_saving_the_rerun_ends_with_the_uninterrupted_weights(
    stop: str, saved: int, uninterrupted, tmp_path: Path
) -> None:
    images, reference = uninterrupted
    args = fit_args(images, tmp_path / "run")
    killed = run(stop, tmp_path / "record", args)
    assert killed.returncode == -signal.SIGKILL
    # The checkpoint on disk is whole: the one of step 4 (the step-6 write never completed).
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == saved
    again = run("none:0", tmp_path / "record", args)  # the same command, as a user or a requeue would
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming the run in" in again.stdout
    first, second = steps_by_process(tmp_path / "record")
    assert second == STEPS - saved < STEPS  # it continued from the checkpoint, it did not start again
    final = weights(tmp_path / "run")
    assert final.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(final[k], reference[k])]
    assert not different, different[:5]  # online head, MoCo-style buffers and BN statistics included


def method_args(method: str, images: Path, run_dir: Path, tmp_path: Path) -> list[str]:
    """``selfsup fit`` of another method (or the linear probe) at the size of :func:`fit_args`."""
    small = ["--model.init_args.backbone.name", "small_cnn", "--model.init_args.backbone.width", "8"]
    if method in ("dino", "mae"):  # a vision transformer of 1 block of width 32, 16 tokens
        vit = {"name": "timm:vit_tiny_patch16_224", "image_size": 32, "patch_size": 8}
        small = [
            "--model.init_args.backbone",
            json.dumps({**vit, "timm_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}),
        ]
    extra = {
        "simclr": ["--model.init_args.proj_hidden", "16", "--model.init_args.online.knn_every", "1"],
        "moco": ["--model.init_args.proj_hidden", "16", "--model.init_args.queue_size", "64"],
        "byol": ["--model.init_args.proj_hidden", "16", "--model.init_args.pred_hidden", "16"],
        "vicreg": ["--model.init_args.expander_dim", "16"],
        "dino": [
            *("--model.init_args.out_dim", "64", "--model.init_args.hidden_dim", "32"),
            *("--model.init_args.bottleneck_dim", "16", "--model.init_args.crops.num_local", "2"),
        ],
        "mae": ["--model.init_args.decoder_dim", "32", "--model.init_args.decoder_depth", "1"],
        "relative_location": ["--model.init_args.grid", "kolesnikov", "--model.init_args.head_hidden", "16"],
        "distill": [
            "--model.init_args.teacher",
            json.dumps({"name": "small_cnn", "width": 8, "weights": str(tmp_path / "teacher.pt")}),
        ],
        "linear_probe": [],
    }[method]
    if method == "distill" and not (tmp_path / "teacher.pt").is_file():  # a teacher of its own, made once
        torch.save(BackboneSpec(name="small_cnn", width=8).build().state_dict(), tmp_path / "teacher.pt")
    return [
        *(
            "fit",
            "--config",
            str(REPO / "configs/trainer/cpu.yaml"),
            "--config",
            str(REPO / f"configs/{method}/cifar10.yaml"),
        ),
        *small,
        *extra,
        *("--data.root", str(images), "--data.batch_size", "16", "--trainer.max_epochs", "2"),
        *("--trainer.enable_progress_bar", "false", "--checkpoint.every_n_steps", "2"),
        *("--trainer.default_root_dir", str(run_dir), "--trainer.logger", "false"),
    ]


SLURM = {
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "selfsup",
    "SLURM_NODELIST": "cpu01",
}
#: Time checkpoints instead of step ones: every 60 microseconds, so at every step's end.
BY_TIME = ("--checkpoint.every_n_steps", "null", "--checkpoint.every_minutes", "0.000001")
#: One run stopped at every kind of checkpoint in turn and run again after each stop, in
#: 3 epochs of 7 steps with a step checkpoint every 2 steps: (stop, checkpoint arguments, the
#: step of the checkpoint it leaves, its exit status, SLURM or not).
KINDS = [
    ("batch:3", (), 2, -signal.SIGKILL, False),  # killed: the step checkpoint
    ("batch:5", BY_TIME, 5, -signal.SIGKILL, False),  # killed: the time checkpoint
    ("term:6", (), 7, 128 + signal.SIGTERM, False),  # in an epoch's last step: saved after validation
    ("batch:14", (), 14, -signal.SIGKILL, False),  # killed: the epoch-end checkpoint
    ("int:16", (), 17, 128 + signal.SIGINT, False),  # Ctrl-C
    ("usr1:18", (), 19, 128 + signal.SIGUSR1, True),  # SLURM's warning before the time limit: requeued
    ("none:0", (), 21, 0, False),
]


def stopped_at_every_kind(
    args: list[str], run_dir: Path, tmp_path: Path, kinds: list[tuple] = KINDS
) -> list[subprocess.CompletedProcess]:
    """Run ``args`` through :data:`KINDS`, checking each stop's checkpoint and exit status."""
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir(exist_ok=True)
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol_calls"}\n')
    scontrol.chmod(0o755)
    slurm = {**SLURM, "PATH": f"{scontrol.parent}:{os.environ['PATH']}"}
    ran = []
    for stop, extra, saved, status, in_slurm in kinds:
        p = run(stop, tmp_path / "record", [*args, *extra], env=slurm if in_slurm else None)
        assert p.returncode == status, (stop, p.stdout[-1000:], p.stderr[-2000:])
        assert "Traceback" not in p.stderr, p.stderr[-2000:]
        state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert state["global_step"] == saved, stop
        per_epoch = 3 if "ddp" in args else 4 if "--trainer.accumulate_grad_batches" in args else STEPS // 2
        if stop.startswith("term") and saved % per_epoch == 0:  # in an epoch's last step: saved after validation
            epochs = state["loops"]["fit_loop"]["epoch_progress"]["current"]
            assert epochs["processed"] == epochs["ready"] == saved // per_epoch
        ran.append(p)
    # Every process after the first continued from the step its predecessor saved.
    starts, ranks = [k[2] for k in kinds[:-1]], 2 if "ddp" in args else 1
    firsts = [int(line.split()[1]) for line in first_steps(tmp_path / "record")]
    if "--trainer.accumulate_grad_batches" in args:  # (a batch that does not step leaves the step as it was)
        assert all(s <= f <= s + 1 for s, f in zip([0, *starts], firsts, strict=True)), firsts
    else:
        assert firsts == [s + 1 for s in [0, *starts] for _ in range(ranks)]
    return ran


def first_steps(record: Path) -> list[str]:
    """The first line each process wrote to its record."""
    seen, out = set(), []
    for line in record.read_text().splitlines():
        if line.split()[0] not in seen:
            seen.add(line.split()[0])
            out.append(line)
    return out


def assert_same_state(run_dir: Path, reference_dir: Path) -> None:
    """Weights, BatchNorm statistics, buffers and optimizer state equal, bit for bit."""
    final, expected = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        for d in (run_dir, reference_dir)
    )
    assert final["global_step"] == expected["global_step"]
    assert final["state_dict"].keys() == expected["state_dict"].keys()
    different = [k for k, v in expected["state_dict"].items() if not torch.equal(final["state_dict"][k], v)]
    assert not different, different[:5]
    for mine, theirs in zip(final["optimizer_states"], expected["optimizer_states"], strict=True):
        assert mine["state"].keys() == theirs["state"].keys()
        for i, moments in theirs["state"].items():
            for k, v in moments.items():
                assert torch.equal(mine["state"][i][k], v) if isinstance(v, torch.Tensor) else mine["state"][i][k] == v


#: The stops that reach a method's own state at both places a run resumes from: killed after a
#: step checkpoint (mid-epoch) and stopped in an epoch's last step (saved after validation). The
#: other kinds are the run layer's, and SimCLR goes through all of them.
METHOD_KINDS = [KINDS[0], KINDS[2], KINDS[-1]]
#: A piece of each method's own state, so that the comparison is known to include it.
OWN_STATE = {
    "moco": "queue",
    "byol": "target_backbone.",
    "dino": "teacher_backbone.",
    "mae": "decoder.mask_token",
}


def stopped_and_compared(method: str, images: Path, tmp_path: Path, kinds: list[tuple]) -> list:
    """A run of ``method`` stopped at ``kinds`` and one that never stopped: bitwise equal at the end."""
    three_epochs = ["--trainer.max_epochs", "3"]
    args = method_args(method, images, tmp_path / "run", tmp_path) + three_epochs
    reference = method_args(method, images, tmp_path / "ref", tmp_path) + three_epochs
    reference = run("none:0", tmp_path / "ref_record", reference)
    assert reference.returncode == 0, reference.stderr[-2000:]
    ran = stopped_at_every_kind(args, tmp_path / "run", tmp_path, kinds)
    assert_same_state(tmp_path / "run", tmp_path / "ref")
    return ran


def test_a_run_stopped_at_every_kind_of_checkpoint_ends_bitwise_equal(uninterrupted, tmp_path: Path) -> None:
    """Killed after a step, a time and an epoch-end checkpoint, stopped by SIGTERM, Ctrl-C and
    SLURM's SIGUSR1, run again after each: the run ends as one that never stopped, bit for bit."""
    ran = stopped_and_compared("simclr", uninterrupted[0], tmp_path, KINDS)
    stops = [kind[0] for kind in KINDS]
    said = {s: [x for x in p.stdout.splitlines() if x.startswith("stopped")] for s, p in zip(stops, ran, strict=True)}
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    again = "run the same command again to continue"
    assert said["term:6"] == [f"stopped by SIGTERM at step 7: checkpoint {ckpt}; {again}"]
    assert said["int:16"] == [f"stopped by Ctrl-C at step 17: checkpoint {ckpt}; {again}"]
    requeued = "SLURM job 4242 requeued: it continues from there"
    assert said["usr1:18"] == [f"stopped by SIGUSR1 at step 19: checkpoint {ckpt}; {requeued}"]
    assert (tmp_path / "scontrol_calls").read_text().split() == ["requeue", "4242"]
    assert not list((tmp_path / "run").glob("hpc_ckpt_*"))  # Lightning's mid-step SIGUSR1 checkpoint: not written


@pytest.mark.parametrize(
    "method", ["moco", "byol", "vicreg", "relative_location", "distill", "linear_probe", "dino", "mae"]
)
def test_every_method_killed_and_stopped_ends_bitwise_equal(method: str, uninterrupted, tmp_path: Path) -> None:
    """Every method (queues, targets, teachers, DINO's centre, MAE's masks) killed mid-epoch and
    stopped in an epoch's last step, run again after each, ends as a run that never stopped."""
    stopped_and_compared(method, uninterrupted[0], tmp_path, METHOD_KINDS)
    if method in OWN_STATE:
        state = weights(tmp_path / "run")
        assert any(k.startswith(OWN_STATE[method]) for k in state), sorted(state)[:20]
    if method == "dino":
        assert "criterion.center" in weights(tmp_path / "run")


#: Gradients summed over 2 batches (7 an epoch: 4 optimizer steps), 2 epochs; the kinds whose
#: checkpoint could fall between the batches of one step.
ACCUMULATED = [
    ("batch:3", (), 2, -signal.SIGKILL, False),  # the step checkpoint
    ("batch:5", BY_TIME, 5, -signal.SIGKILL, False),  # time checkpoints: only after an optimizer step
    ("term:5", (), 6, 128 + signal.SIGTERM, False),  # signalled in a step's first batch: saved after its second
    ("none:0", (), 8, 0, False),
]


def test_gradient_accumulation_stopped_at_every_kind_of_checkpoint_ends_bitwise_equal(
    uninterrupted, tmp_path: Path
) -> None:
    images, _ = uninterrupted
    accumulate = ["--trainer.accumulate_grad_batches", "2"]
    args, reference = (method_args("simclr", images, tmp_path / d, tmp_path) + accumulate for d in ("run", "ref"))
    done = run("none:0", tmp_path / "ref_record", reference)
    assert done.returncode == 0, done.stderr[-2000:]
    stopped_at_every_kind(args, tmp_path / "run", tmp_path, ACCUMULATED)
    assert_same_state(tmp_path / "run", tmp_path / "ref")


def test_a_step_checkpoint_on_an_epochs_last_batch_waits_for_the_epoch_end(uninterrupted, tmp_path: Path) -> None:
    """Steps falling on an epoch's last batch (7 of 7) are saved at the epoch's end, after its
    validation: a checkpoint from before it resumes with Lightning's epoch counters one behind,
    and the checkpoint the resumed run writes next restarts that epoch (found by the soak script)."""
    images, reference = uninterrupted
    args = fit_args(images, tmp_path / "run", "--checkpoint.every_n_steps", "7")
    assert run("batch:8", tmp_path / "record", args).returncode == -signal.SIGKILL
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    epochs = state["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert state["global_step"] == 7 and epochs["processed"] == epochs["ready"] == 1  # the epoch's end
    again = run("none:0", tmp_path / "record", args)
    assert again.returncode == 0, again.stderr[-2000:]
    final = weights(tmp_path / "run")
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def rows_trained(record: Path) -> list[list[int]]:
    """The image rows of every trained step, in order, over all processes."""
    return [[int(x) for x in line.split()[2].split(",")] for line in record.read_text().splitlines()]


def test_streamed_run_killed_mid_epoch_resumes_at_the_same_place_of_the_stream(uninterrupted, tmp_path: Path) -> None:
    """A LitData dataset read by 2 workers (batches alternate between them), killed in the
    middle of its first epoch: the re-run trains the batches the uninterrupted run trained next,
    in the same order, and no batch twice."""
    pytest.importorskip("litdata")
    from selfsup.data.litdata.write import optimize_folder

    images, _ = uninterrupted
    optimize_folder(images, tmp_path / "optimized", workers=2)
    stream = (
        "--data.source",
        "stream",
        "--data.root",
        str(tmp_path / "optimized"),
        "--data.image_size",
        "32",
        "--data.num_workers",
        "2",
    )
    reference = run("none:0", tmp_path / "reference", [*fit_args(images, tmp_path / "ref"), *stream])
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = rows_trained(tmp_path / "reference")
    assert len(expected) == STEPS and sorted(sum(expected[:7], [])) != sum(expected[:7], [])  # shuffled
    args = [*fit_args(images, tmp_path / "run"), *stream]
    assert run("batch:5", tmp_path / "record", args).returncode == -signal.SIGKILL
    again = run("none:0", tmp_path / "record", args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert steps_by_process(tmp_path / "record") == [5, STEPS - 4]  # steps 0-4, then from the step-4 checkpoint
    trained = rows_trained(tmp_path / "record")
    assert trained[:4] + trained[5:] == expected  # step 4 trained twice (after the checkpoint); nothing else


def test_fresh_start_and_another_config_in_the_same_folder(uninterrupted, tmp_path: Path) -> None:
    images, _ = uninterrupted
    args = fit_args(images, tmp_path / "run", "--trainer.max_epochs", "1")
    assert run("none:0", tmp_path / "record", args).returncode == 0
    other = run("none:0", tmp_path / "record", [*args, "--model.init_args.temperature", "0.2"])
    assert other.returncode == 2
    (line,) = [x for x in other.stderr.splitlines() if x.startswith("selfsup: error:")]
    assert "holds a run with another config (model.init_args differs)" in line and "--fresh true" in line
    fresh = run("none:0", tmp_path / "record", [*args, "--model.init_args.temperature", "0.2", "--fresh", "true"])
    assert fresh.returncode == 0 and "starting afresh" in fresh.stdout
    assert steps_by_process(tmp_path / "record") == [7, 7]


def test_a_second_run_on_a_held_folder_is_refused_and_the_first_finishes(uninterrupted, tmp_path: Path) -> None:
    images, reference = uninterrupted
    args = fit_args(images, tmp_path / "run")
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "WANDB_MODE": "offline"}
    first = start("slow:0", tmp_path / "record", args, env, tmp_path / "first")  # 0.3 s more every step
    try:
        deadline = time.time() + 120
        while not (tmp_path / "record").is_file():  # training has begun
            assert first.running() and time.time() < deadline, first.wait(args).stderr[-2000:]
            time.sleep(0.05)
        second = run("none:0", tmp_path / "record2", args)
        assert first.running()  # (the test would prove nothing otherwise)
        done = first.wait(args)
    finally:
        first.kill()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    (line,) = [x for x in second.stderr.splitlines() if x.startswith("selfsup: error:")]
    held = f"selfsup: error: {(tmp_path / 'run').resolve()} is in use by selfsup fit (process {first.pid} on "
    assert line.startswith(held)
    assert done.returncode == 0, done.stderr[-2000:]
    assert steps_by_process(tmp_path / "record") == [STEPS] and not (tmp_path / "record2").exists()
    final = weights(tmp_path / "run")
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_a_full_disk_keeps_the_last_good_checkpoint_and_ends_in_one_line(uninterrupted, tmp_path: Path) -> None:
    images, _ = uninterrupted
    small = tmp_path / "small"
    mounted = mount_tmpfs(small, "8m")
    try:
        args = fit_args(images, small / "run")
        stopped = run("fill:5" if mounted else "nospace:6", tmp_path / "record", args)
        assert stopped.returncode == 2, stopped.stderr[-3000:]
        assert "Traceback" not in stopped.stderr
        (line,) = [x for x in stopped.stderr.splitlines() if x.startswith("selfsup: error:")]
        ckpt = small / "run" / "checkpoints" / "last.ckpt"
        assert f"no space left in {ckpt.parent} to write last.ckpt (" in line and " needed, " in line
        assert line.endswith(f"the last good checkpoint is {ckpt}")
        # The step-4 checkpoint is whole; the step-6 one was never half written over it.
        assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 4
        assert steps_by_process(tmp_path / "record") == [6]
        assert not [p for p in ckpt.parent.iterdir() if p.name != "last.ckpt"]
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(small)], check=False)


#: 2 processes on gloo; 60 images each, batch 16: 3 steps an epoch, 12 in all.
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", "4"]
#: :data:`KINDS` for that job: (stop, checkpoint arguments, saved step, exit status, SLURM or not).
DDP_KINDS = [
    ("batch:2", (), 2, -signal.SIGKILL, False),  # the step checkpoint
    ("batch:5", BY_TIME, 5, -signal.SIGKILL, False),  # the time checkpoint
    ("term:5", (), 6, 128 + signal.SIGTERM, False),  # in an epoch's last step: saved after validation
    ("batch:9", (), 9, -signal.SIGKILL, False),  # the epoch-end checkpoint
    ("int:9", (), 10, 128 + signal.SIGINT, False),  # Ctrl-C
    ("usr1:10", (), 11, 128 + signal.SIGUSR1, True),  # SLURM's warning signal, one task per rank
    ("none:0", (), 12, 0, False),
]


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_a_ddp_job_stopped_at_every_kind_of_checkpoint_ends_bitwise_equal(
    method: str, uninterrupted, tmp_path: Path
) -> None:
    """Every rank's random stream is in the checkpoint, and a signal to the first process stops
    all of them after the same step: a 2-process job killed (all of it, as a scheduler kills a
    job) or stopped at every kind of checkpoint and run again ends as the job that never stopped."""
    images, _ = uninterrupted
    args, reference = (method_args(method, images, tmp_path / d, tmp_path) + DDP for d in ("run", "ref"))
    done = run("none:0", tmp_path / "ref_record", reference)
    assert done.returncode == 0, done.stderr[-2000:]
    # MoCo (its queue gathered from both ranks) through the stops that reach a method's state.
    kinds = DDP_KINDS if method == "simclr" else [DDP_KINDS[0], DDP_KINDS[2], DDP_KINDS[-1]]
    ran = stopped_at_every_kind(args, tmp_path / "run", tmp_path, kinds)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert len(state["rng_states"]["ranks"]) == 2
    assert_same_state(tmp_path / "run", tmp_path / "ref")
    for p in ran:  # one voice: the first process alone says where it stopped
        assert len([x for x in p.stdout.splitlines() if x.startswith("stopped by")]) <= 1


def test_non_finite_loss_stops_with_the_step_and_the_rate(uninterrupted, tmp_path: Path) -> None:
    images, _ = uninterrupted
    # SGD at a rate of 1e30: the weights overflow within a few steps.
    args = fit_args(
        images,
        tmp_path / "run",
        "--model.init_args.optimizer.name",
        "sgd",
        "--model.init_args.optimizer.lr",
        "1e30",
        "--warmup.warmup_epochs",
        "0",
        "--lr_scaling.rule",
        "none",
        "--checkpoint.every_n_steps",
        "1",
    )
    p = run("none:0", tmp_path / "record", args)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("selfsup: error:")]
    assert "the loss is nan at step" in line or "the loss is inf at step" in line
    lr = float(re.search(r"lr ([0-9.e+]+)\)", line).group(1))
    assert 1e29 < lr <= 1e30  # the rate of that step (cosine decay from 1e30)
    assert "lower optimizer.lr" in line and "last good checkpoint" in line
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


class AlignmentOnly(SimCLR):
    """SimCLR without negatives: only pulls the two views together, which collapses every image
    onto one point (why contrastive losses need negatives)."""

    def loss(self, v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.backbone(torch.cat([v0, v1]))
        z0, z1 = F.normalize(self.projector(h), dim=1).chunk(2)
        return (z0 - z1).pow(2).sum(1).mean(), h[: v0.shape[0]], z0


def test_collapse_is_measured_and_warned_about_once(image_folder: Path, tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = ImageDataModule(root=str(image_folder), batch_size=16)
    healthy = SimCLR(backbone={"name": "small_cnn", "width": 8}, proj_hidden=16, online=OnlineSpec(enabled=False))
    collapsing = AlignmentOnly(
        backbone={"name": "small_cnn", "width": 8},
        proj_hidden=16,
        optimizer={"name": "adam", "lr": 0.05},
        online=OnlineSpec(enabled=False),
    )
    spread = {}
    for name, model in (("healthy", healthy), ("collapsing", collapsing)):
        watch = CollapseWatch(after_steps=5)
        t = L.Trainer(
            accelerator="cpu",
            max_epochs=4,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=str(tmp_path),
            callbacks=[watch],
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.fit(model, datamodule=dm)
        said = [str(w.message) for w in caught if "collapsed" in str(w.message)]
        spread[name] = float(t.callback_metrics["train/embedding_spread_epoch"])
        if name == "healthy":
            assert not said and spread[name] > 0.3
        else:
            assert len(said) == 1 and watch.warned  # once, however long it stays collapsed
            assert "train/embedding_spread" in said[0] and "lower optimizer.lr" in said[0]
            assert spread[name] < 0.05


def test_pipeline_rerun_keeps_finished_stages_and_resumes_the_killed_one(uninterrupted, tmp_path: Path) -> None:
    images, _ = uninterrupted
    args = [
        "pipeline",
        "--config",
        str(REPO / "configs/pipeline/quickstart.yaml"),
        "--data.root",
        str(images),
        "--backbone.width",
        "8",
        "--data.batch_size",
        "16",
        "--stages.relative_location.enabled",
        "false",
        "--stages.simclr.max_epochs",
        "2",
        "--stages.simclr.model",
        '{"proj_hidden": 16}',
        "--evaluations.linear.max_epochs",
        "1",
        "--checkpoint.every_n_steps",
        "2",
        "--wandb.enabled",
        "false",
    ]
    whole = run("none:0", tmp_path / "whole_record", [*args, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "out"
    killed = run("batch:5@simclr", tmp_path / "record", [*args, "--out", str(out)])
    assert killed.returncode == -signal.SIGKILL
    assert (out / "random_probe" / "result.json").is_file() and not (out / "simclr" / "result.json").exists()
    again = run("none:0", tmp_path / "record", [*args, "--out", str(out)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "pipeline: random_probe finished earlier" in again.stdout
    assert "pipeline: simclr was interrupted; continuing from" in again.stdout
    # Killed: the probe of the random backbone (7 steps) and 5 SimCLR steps; then 14 - 4 SimCLR
    # steps and the SimCLR probe's 7: the baseline did not run again.
    assert steps_by_process(tmp_path / "record") == [7 + 5, STEPS - 4 + 7]
    a = json.loads((tmp_path / "whole" / "summary.json").read_text())["results"]
    b = json.loads((out / "summary.json").read_text())["results"]
    for entry in ("random", "simclr"):
        assert a[entry]["linear_top1"] == b[entry]["linear_top1"], entry
    # The rows count the time of the run that was killed: the kept probe's and SimCLR's first steps.
    kept = json.loads((out / "random_probe" / "result.json").read_text())["seconds"]
    assert b["random"]["seconds"] >= kept > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seconds_in_all"] > summary["wall_seconds"] + kept
    assert "s of them in the run that finished." in again.stdout
    assert all(torch.equal(weights(out / "simclr")[k], v) for k, v in weights(tmp_path / "whole" / "simclr").items())


def test_out_of_memory_ends_in_one_line_with_the_fix(uninterrupted, tmp_path: Path) -> None:
    images, _ = uninterrupted
    p = run("oom:3", tmp_path / "record", fit_args(images, tmp_path / "run"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("selfsup: error:")]
    assert "out of GPU memory at step 3 with 16 images per device" in line
    assert "--data.batch_size 8 --trainer.accumulate_grad_batches 2 keeps the global batch" in line


def test_checkpointing_off_writes_no_checkpoint(image_folder: Path, tmp_path: Path) -> None:
    from selfsup.cli import SelfsupCLI

    args = fit_args(
        image_folder,
        tmp_path / "run",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.max_epochs",
        "1",
        "--trainer.logger",
        "false",
    )
    cli = SelfsupCLI(args)
    assert cli.trainer.global_step == 7
    assert not list((tmp_path / "run").rglob("*.ckpt"))
