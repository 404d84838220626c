"""The run folder's files on a real cluster's filesystems: checkpoints replaced by rename on any
filesystem, a full disk that leaves the last good checkpoint, the small files written whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch

from selfsup import SelfsupError
from selfsup.data import ImageDataModule
from selfsup.files import hold_folder, release_folder, write_atomic
from selfsup.methods import SimCLR
from selfsup.models import BackboneSpec
from selfsup.run import run_plugins


def mount_tmpfs(where: Path, size: str) -> bool:
    """A small tmpfs at ``where`` where the machine allows mounting one (root in most CI containers)."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    except FileNotFoundError:
        return False
    return done.returncode == 0


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than ``$TMPDIR`` (which is set to one under tmp_path)."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    shm = Path("/dev/shm")
    mounted = None
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmpdir.stat().st_dev:
        folder = Path(tempfile.mkdtemp(dir=shm))
    elif mount_tmpfs(tmp_path / "mnt", "64m"):
        folder = mounted = tmp_path / "mnt"
    else:
        pytest.skip("no second filesystem here (no /dev/shm, no mount)")
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmpdir)
    tempfile.tempdir = None  # read $TMPDIR again
    try:
        yield folder
    finally:
        os.environ.pop("TMPDIR") if old is None else os.environ.__setitem__("TMPDIR", old)
        tempfile.tempdir = None
        if mounted:
            subprocess.run(["umount", "-l", str(mounted)], check=False)
        else:
            subprocess.run(["rm", "-rf", str(folder)], check=False)


def test_a_checkpoint_on_another_filesystem_than_tmpdir_is_replaced_by_rename(
    image_folder: Path, other_filesystem: Path
) -> None:
    assert other_filesystem.stat().st_dev != Path(tempfile.gettempdir()).stat().st_dev
    model = SimCLR(backbone=BackboneSpec(width=8), proj_hidden=16)
    dm = ImageDataModule(root=str(image_folder), batch_size=32)
    trainer = L.Trainer(
        max_steps=2,
        plugins=run_plugins(),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(image_folder.parent / "fit"),
    )
    trainer.fit(model, datamodule=dm)
    path = other_filesystem / "run" / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(path)
    old = path.open("rb")  # the old file stays open: its inode cannot be reused, its bytes are the old ones
    try:
        before = old.read()
        old.seek(0)
        inode = os.fstat(old.fileno()).st_ino
        model.backbone.stem[0].weight.data.add_(1.0)  # another checkpoint than the first
        trainer.save_checkpoint(path)
        assert path.stat().st_ino != inode  # renamed into place, not copied over the old file
        assert old.read() == before  # the old checkpoint was never written over
    finally:
        old.close()
    saved = torch.load(path, weights_only=True)["state_dict"]["backbone.stem.0.weight"]
    assert torch.equal(saved, model.backbone.stem[0].weight.data)
    assert not [p for p in path.parent.iterdir() if p.name != "last.ckpt"]  # no temporary file left behind


def test_write_atomic_replaces_whole_files_and_says_why_it_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "a" / "summary.json"
    write_atomic(path, "first\n")
    write_atomic(path, b"second\n")
    write_atomic(path, lambda f: f.write(b"third\n"))
    assert path.read_text() == "third\n" and sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SelfsupError, match=f"cannot write in {locked} .*choose a folder you can write to"):
            write_atomic(locked / "x.json", "{}")


def test_a_folder_is_held_until_its_process_ends(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    # Another process holds it (and is alive): refused in one line naming it.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from selfsup.files import hold_folder; hold_folder(sys.argv[1], 'selfsup fit'); "
            "print('held', flush=True); time.sleep(60)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(SelfsupError, match=rf"is in use by selfsup fit \(process {holder.pid} on "):
            hold_folder(folder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Killed, it holds nothing: no stale lock to remove by hand.
    hold_folder(folder)
    hold_folder(folder)  # this process's own folder: held already
    release_folder(folder)


def test_a_killed_runs_forked_workers_do_not_hold_its_folder(tmp_path: Path) -> None:
    """Data loader workers are forked from the run and outlive it by seconds when it is killed:
    the folder's lock is the run's own, not theirs, so the re-run may start at once."""
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time; from selfsup.files import hold_folder; hold_folder(sys.argv[1], 'selfsup fit'); "
            "worker = os.fork()\n"
            "if worker == 0: time.sleep(60); os._exit(0)\n"
            "print(worker, flush=True); time.sleep(60)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    worker = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(worker, 0)  # the worker lives on
        hold_folder(folder)  # and holds nothing
        release_folder(folder)
    finally:
        os.kill(worker, signal.SIGKILL)
