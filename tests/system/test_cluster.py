"""Cluster launch: the SLURM scripts under a simulated allocation, and the torchrun launcher on CPU."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment

from selfsup.callbacks import LearningRateScaling
from selfsup.cli import SelfsupCLI, main

from conftest import SMALL_SIMCLR

REPO = Path(__file__).resolve().parents[2]
SBATCH = sorted((REPO / "scripts" / "slurm").glob("*.sbatch"))


def sbatch_directives(path: Path) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^#SBATCH --([\w-]+)=(\S+)", path.read_text(), re.M))


def srun_arguments(path: Path, env: dict[str, str], config: str, extra: list[str]) -> list[str]:
    """The `selfsup` arguments of the script's srun line, with SLURM's variables filled in."""
    text = path.read_text().replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if x.startswith("srun ")]
    words = shlex.split(line.replace('"$CONFIG"', config).replace('"$@"', ""))
    assert words[:3] == ["srun", "selfsup", "fit"]
    return [re.sub(r"\$(\w+)", lambda m: env[m.group(1)], w) for w in words[3:]] + extra


def slurm_env(nodes: int, tasks_per_node: int, proc_id: int) -> dict[str, str]:
    """What srun sets in one task of an allocation (see `man srun`, OUTPUT ENVIRONMENT VARIABLES)."""
    return {
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_NNODES": str(nodes),
        "SLURM_PROCID": str(proc_id),
        "SLURM_LOCALID": str(proc_id % tasks_per_node),
        "SLURM_NODEID": str(proc_id // tasks_per_node),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "selfsup",
        "SLURM_NODELIST": "gpu[07-08]",
    }


def test_sbatch_scripts_run_one_task_per_gpu() -> None:
    assert {p.name for p in SBATCH} == {"single_node.sbatch", "multi_node.sbatch"}
    for path in SBATCH:
        d = sbatch_directives(path)
        assert d["ntasks-per-node"] == d["gres"].removeprefix("gpu:"), path.name  # one task per GPU
        assert (REPO / "configs/trainer/slurm.yaml").is_file() and "srun selfsup fit" in path.read_text()
    assert sbatch_directives(REPO / "scripts/slurm/multi_node.sbatch")["nodes"] == "2"


def test_simulated_slurm_job_two_nodes_by_four_tasks(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The multi-node script's command under the variables srun sets in task 5 of a 2 x 4 job:
    the Trainer sees world size 8 and the rate follows 8 x the per-device batch. Nothing launches
    (building the Trainer starts no process group)."""
    path = REPO / "scripts/slurm/multi_node.sbatch"
    d = sbatch_directives(path)
    env = slurm_env(int(d["nodes"]), int(d["ntasks-per-node"]), proc_id=5)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(REPO)  # where the script is submitted from; run=False writes nothing
    args = srun_arguments(
        path,
        env,
        str(REPO / "configs/simclr/cifar10.yaml"),
        [
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "32-true",
            "--trainer.logger",
            "false",
            "--data.root",
            str(image_folder),
            "--data.batch_size",
            "32",
        ],
    )
    cli = SelfsupCLI(args, run=False)
    trainer = cli.trainer
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert trainer.world_size == 8 and trainer.num_nodes == 2 and trainer.num_devices == 4
    assert (trainer.global_rank, trainer.node_rank, trainer.local_rank) == (5, 1, 1)
    (scaling,) = [cb for cb in trainer.callbacks if isinstance(cb, LearningRateScaling)]
    base_lr = cli.model.hparams.optimizer["lr"]
    global_batch, lr = scaling.resolve(trainer, base_lr, cli.datamodule.hparams.batch_size)
    assert global_batch == 8 * 32 == 256 and lr == pytest.approx(0.3)
    assert scaling.describe(base_lr, global_batch, lr) == (
        "lr scaling: base_lr=0.3 global_batch=256 reference=256 rule=linear -> lr=0.3"
    )
    trainer.accumulate_grad_batches = 4  # accumulation counts as well
    assert scaling.resolve(trainer, 0.3, 32) == (1024, pytest.approx(1.2))


def test_slurm_allocation_that_does_not_match_the_trainer_fails_in_one_line(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for k, v in slurm_env(nodes=2, tasks_per_node=2, proc_id=0).items():  # 2 tasks per node, 4 devices asked
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs/trainer/slurm.yaml"),
                "--config",
                str(REPO / "configs/simclr/cifar10.yaml"),
                "--trainer.accelerator",
                "cpu",
                "--trainer.precision",
                "32-true",
                "--trainer.logger",
                "false",
                "--data.root",
                str(image_folder),
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("selfsup: error: You set `devices=4`") and "--ntasks-per-node=2" in err
    assert "one task per device" in err


def test_torchrun_launcher_two_processes_on_cpu(image_folder: Path, tmp_path: Path) -> None:
    """scripts/torchrun.sh starts 2 gloo processes; the Trainer agrees and the rate doubles."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, NPROC_PER_NODE="2", OMP_NUM_THREADS="1")
    p = subprocess.run(
        [
            "bash",
            str(REPO / "scripts/torchrun.sh"),
            *SMALL_SIMCLR,
            "--model.init_args.proj_hidden",
            "16",
            "--data.root",
            str(image_folder),
            "--data.batch_size",
            "16",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [x for x in p.stdout.splitlines() if x.startswith("lr scaling:")]
    assert lines == ["lr scaling: base_lr=0.3 global_batch=32 reference=256 rule=linear -> lr=0.0375"]


def test_torchrun_inside_a_slurm_job_keeps_torchelastic(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun started from an sbatch script: SLURM's variables and torchrun's are both set, and
    the Trainer takes its world from torchrun (as Lightning chooses), not from SLURM's one task;
    one callback given alone in the config is taken as a list of one."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning_utilities.core import rank_zero as utils_rank_zero

    # Building a Trainer as rank 1 sets Lightning's process-wide rank: give it back afterwards,
    # or every later test in this process would print and log as a rank other than zero.
    for module in (fabric_rank_zero, utils_rank_zero):
        monkeypatch.setattr(module.rank_zero_only, "rank", module.rank_zero_only.rank)

    for k, v in slurm_env(1, 1, proc_id=0).items():
        monkeypatch.setenv(k, v)
    torchrun = {
        "RANK": "1",
        "GROUP_RANK": "0",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
        "TORCHELASTIC_RUN_ID": "x",
    }
    for k, v in torchrun.items():
        monkeypatch.setenv(k, v)
    args = [
        *SMALL_SIMCLR,
        "--data.root",
        str(image_folder),
        "--data.batch_size",
        "16",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.callbacks",
        "lightning.pytorch.callbacks.LearningRateMonitor",
    ]
    trainer = SelfsupCLI(args, run=False).trainer
    assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)
    assert trainer.world_size == 2 and trainer.global_rank == 1
    assert any(isinstance(cb, LearningRateMonitor) for cb in trainer.callbacks)
