"""The ``selfsup`` command: the Lightning CLI (fit, validate, test) and the commands beside it.

selfsup fit --config configs/trainer/cpu.yaml --config configs/simclr/cifar10.yaml
selfsup pipeline --config configs/pipeline/quickstart.yaml [--data.root DIR] [--out DIR]
"""

from __future__ import annotations

import pickle
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar as ProgressBarBase
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from selfsup import SelfsupError
from selfsup.callbacks import LearningRateScaling, ProgressBar, Warmup, global_batch_size, stop_signal
from selfsup.config import ConfigErrorMixin, find_selfsup_error
from selfsup.console import say
from selfsup.data.datamodule import ImageDataModule
from selfsup.data.litdata.write import data_main
from selfsup.evaluation import EVALUATIONS
from selfsup.export import export_main
from selfsup.files import hold_folder, release_folder, write_atomic
from selfsup.methods import PRETRAINING
from selfsup.models.weights import load_safely
from selfsup.pipeline import pipeline_main
from selfsup.protocols import ChecksData
from selfsup.quiet import quiet_lightning
from selfsup.run import (
    add_run_arguments,
    newest_checkpoint,
    run_callbacks,
    run_loggers,
    run_plugins,
    same_run_or_stop,
)
from selfsup.runtime import keep_freed_memory
from selfsup.tracking import finish_wandb
from selfsup.trainer_attrs import datamodule_of
from selfsup.visualize import patches_main

#: The commands beside the Lightning CLI's: name -> (entry point, one line of help).
COMMANDS: dict[str, tuple[Callable[[Sequence[str]], Any], str]] = {
    "pipeline": (pipeline_main, "stages in order on one split, each evaluated; OUT/summary.json and summary.md"),
    "export": (export_main, "a checkpoint's backbone as torchvision / timm / plain weights, with a JSON card"),
    "data": (data_main, "data optimize: an image folder's splits as LitData chunks (--src ROOT --out DIR)"),
    "patches": (patches_main, "draw the relative-location patch grids of a few images to a PNG"),
}


def usage() -> str:
    """The top-level help, made from the registered stages and commands."""

    def names(classes: dict[str, type]) -> str:
        return ", ".join(f"selfsup.{c.__module__.split('.')[1]}.{c.__name__}" for c in classes.values())

    lines = [
        f"usage: selfsup {{fit,validate,test,{','.join(COMMANDS)}}} [--config FILE ...] [--section.key VALUE ...]",
        "",
        "  fit | validate | test   one stage through the Lightning CLI, the model chosen by class_path;",
        "                          see `selfsup fit --help`",
        f"      pretraining:        {names(PRETRAINING)}",
        f"      evaluation:         {names(EVALUATIONS)}",
    ]
    lines += [f"  {name:<22}  {text}; see `selfsup {name} --help`" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


class LoggedConfig(SaveConfigCallback):
    """Save config.yaml in the run folder (replacing an earlier attempt's, atomically: a resumed
    run is the same run) and log the full config as every logger's run config."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.already_saved:
            log_dir = trainer.log_dir  # on every rank: a collective call
            if trainer.is_global_zero and log_dir is not None:
                dumped = self.parser.dump(self.config, skip_none=False)
                write_atomic(Path(log_dir) / self.config_filename, dumped)
        super().setup(trainer, pl_module, stage)  # (save_to_log_dir=False: it writes no file of its own)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
        dm = datamodule_of(trainer)
        # Rank zero only, so no trainer.log_dir here (a collective call): the folder was
        # resolved before the run started (SelfsupCLI._prepare_data).
        if isinstance(dm, ImageDataModule) and dm.run_dir is not None:
            dm.write_bad_files(dm.run_dir)


class SelfsupArgumentParser(ConfigErrorMixin, LightningArgumentParser):
    """Lightning's parser whose errors become one-line SelfsupErrors."""


#: Data settings that change how a run loads its images, not what it learns: a resumed run may differ in them.
HOW_NOT_WHAT = {
    f"data.{k}"
    for k in ("num_workers", "decode_workers", "cache_dir", "cache_min_images", "eval_batch_size", "download")
}


class SelfsupCLI(LightningCLI):
    """Lightning CLI with selfsup's DataModule and any stage module chosen by class_path.

    Every run lives in one folder, ``trainer.default_root_dir`` (default ``runs/<method>``):
    config.yaml, metrics.csv, ``checkpoints/last.ckpt``, the W&B offline files, figures and the
    bad-file list; no version counter. Re-running a command continues its run from the newest
    checkpoint there (``--fresh true`` starts again; ``--ckpt_path last`` says it explicitly).

    The run layer (``selfsup.run``) adds the callbacks every run has, configured in their own
    sections: ``lr_scaling`` (the rate follows the global batch), ``warmup`` (linear warmup, then
    cosine or constant) and ``checkpoint`` (how often ``last.ckpt`` is written); and the guards:
    the random stream saved with checkpoints, a stop at the first non-finite loss, a warning
    when the representation collapses. Without a ``trainer.logger`` in the config the run logs
    to metrics.csv and W&B (offline without an account).
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        quiet_lightning()
        self._started = time.time()
        self._ckpt_path: str | None = None  # what fit continues from, settled in before_fit
        self._held: Path | None = None  # the run folder this command holds
        try:
            self._run(args, run)
        finally:
            if self._held is not None:
                release_folder(self._held)

    def _run(self, args: Sequence[str] | None, run: bool) -> None:
        super().__init__(
            model_class=LightningModule,
            subclass_mode_model=True,
            datamodule_class=ImageDataModule,
            save_config_callback=LoggedConfig,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            # True: "the default loggers", which the run layer makes for the run folder.
            trainer_defaults={"logger": True},
            seed_everything_default=0,
            parser_class=SelfsupArgumentParser,
            args=list(args) if args is not None else None,
            run=run,
        )
        if run:
            finish_wandb(self.trainer)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads --ckpt_path's hyperparameters (weights only): a file holding arbitrary
        # objects is one line, as when the fit itself loads it.
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError:
            load_safely(self.config[self.config.subcommand].get("ckpt_path"))  # raises, saying why in one line
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(LearningRateScaling, "lr_scaling")
        parser.add_class_arguments(Warmup, "warmup")
        add_run_arguments(parser, "start the run again instead of continuing from the run folder's checkpoint")
        # The class count comes from the data (a folder listing, nothing decoded) into every
        # module that takes one, before the module is built: heads exist from __init__ on.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def _section(self, config: Any, key: str) -> Any:
        """A top-level section of this command's config (under the subcommand when there is one)."""
        return (config[self.subcommand] if self.subcommand else config).get(key)

    def before_instantiate_classes(self) -> None:
        """Settle the run folder before anything is built."""
        trainer = self._section(self.config, "trainer")
        if trainer.default_root_dir is None:
            model = self._section(self.config, "model")
            name = str(model.class_path).rsplit(".", 1)[-1] if model else "run"
            trainer.default_root_dir = str(Path("runs") / name.lower())
        self._hold_folder(Path(trainer.default_root_dir))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer with the run layer's callbacks and loggers (``selfsup.run``)."""
        trainer = self._section(self.config_init, "trainer")
        root = Path(trainer["default_root_dir"])
        checkpoint = self._section(self.config_init, "checkpoint")
        if trainer.get("enable_checkpointing") is False:  # asked for none: no last.ckpt either
            checkpoint = None
        given = trainer.get("callbacks") or []
        given = given if isinstance(given, list) else [given]  # one callback may be given alone
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBarBase) for c in given):
            given = [*given, ProgressBar()]  # Lightning's bar, safe under DDP
        kwargs["callbacks"] = [
            *given,
            *run_callbacks(
                self._section(self.config_init, "lr_scaling"),
                self._section(self.config_init, "warmup"),
                checkpoint,
                random_state=True,  # an explicit --ckpt_path restores the random stream too
            ),
        ]
        if trainer.get("logger") is True:
            kwargs["logger"] = run_loggers(root)
        kwargs["plugins"] = run_plugins(trainer.get("plugins"))
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as e:  # Lightning's checks of its own arguments
            raise SelfsupError(f"bad trainer setting: {' '.join(str(e).split())}") from None

    # -- the run folder ------------------------------------------------------------------
    def _hold_folder(self, folder: Path) -> None:
        """One run per folder: the run folder is this process's until the command ends (rank zero
        holds it for the whole job; see ``selfsup.files``)."""
        if getattr(rank_zero_only, "rank", 0) == 0:
            hold_folder(folder, f"selfsup {self.subcommand or 'run'}")
            self._held = folder

    def _prepare_data(self) -> None:
        """Decode the data (or read the job's cache), report and check it before the Trainer
        starts any logger or process: a stop for bad files, missing labels or too small images
        leaves no half-started run behind. Under DDP every process gets here; the first to
        need a decoded set builds it, the others read it (see ``selfsup.data.cache``)."""
        dm = self.datamodule
        if not isinstance(dm, ImageDataModule):
            return
        dm.trainer = self.trainer  # its world size decides whether the decoded set is shared
        if getattr(rank_zero_only, "rank", 0) == 0:  # Lightning sets the attribute; the function's type lacks it
            # bad_files.txt goes beside config.yaml; LoggedConfig writes it once the logger has
            # made the folder (a file there before would make the CSV logger warn).
            dm.run_dir, dm.defer_bad_files = self.trainer.log_dir, True
        dm.setup("fit")
        if isinstance(self.model, ChecksData):
            self.model.check_data(dm)

    def _resume_from(self, given: str | None) -> str | None:
        """The checkpoint this fit continues from: ``--ckpt_path`` as given, else (unless
        ``--fresh``) the newest in the run folder, after checking it is this run's."""
        root = Path(self.trainer.default_root_dir)
        if given not in (None, "last"):
            return given
        if given is None and self._section(self.config, "fresh"):
            say(f"starting afresh in {root} (--fresh): its earlier checkpoints are overwritten as this run saves")
            return None
        ckpt = newest_checkpoint(root)
        if ckpt is None:
            if given == "last":
                say(f"no checkpoint in {root} yet: training from the start")
            return None
        saved = root / "config.yaml"
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        current = dumped[self.subcommand] if self.subcommand else dumped
        recorded = (yaml.safe_load(saved.read_text()) or {}) if saved.is_file() else None
        same_run_or_stop(
            root,
            _model_and_data(recorded) if recorded is not None else None,
            _model_and_data(current),
            "continue it with its own config, start it again with --fresh true, or give this run "
            "its own folder with --trainer.default_root_dir",
            ignore=HOW_NOT_WHAT,
        )
        say(f"resuming the run in {root} from {ckpt} (--fresh true starts again)")
        return str(ckpt)

    def before_fit(self) -> None:
        self._prepare_data()
        given = self._section(self.config_init, "ckpt_path")
        self._ckpt_path = self._resume_from(given)  # said, and checked, before the run starts
        say(describe_run(self.model, self.datamodule, self.trainer))

    def fit(
        self,
        model: LightningModule,
        datamodule: LightningDataModule | None = None,
        ckpt_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``trainer.fit``, continuing the run folder's run (LightningCLI calls this method of
        the CLI, when it has one, for the ``fit`` subcommand)."""
        self.trainer.fit(model, datamodule=datamodule, ckpt_path=self._ckpt_path, **kwargs)

    def after_fit(self) -> None:
        say(describe_results(self.trainer, time.time() - self._started))

    def before_validate(self) -> None:
        self._prepare_data()

    def before_test(self) -> None:
        self._prepare_data()


def _model_and_data(config: dict[str, Any]) -> dict[str, Any]:
    """The sections of a run's config that say what it learns from what."""
    return {"model": config.get("model") or {}, "data": config.get("data") or {}}


def describe_run(model: LightningModule, dm: object, trainer: Trainer) -> str:
    """One line: what this fit does (method, data, images, devices, global batch, folder)."""
    method = type(model).__name__
    if not isinstance(dm, ImageDataModule) or dm.train_set is None:
        return f"selfsup fit: {method}, run folder {trainer.default_root_dir}"
    where = dm.hp.root or "the embedded sample"
    labels = f"{dm.num_classes} classes" if dm.has_labels else "unlabeled"
    batch = global_batch_size(trainer, dm.hp.batch_size)
    devices = trainer.world_size
    train, evals = dm.splits()
    return (
        f"selfsup fit: {method} on {where} ({len(train):,} train / {len(evals):,} eval images, "
        f"{labels}, {dm.image_size} px), {devices} device{'s' if devices > 1 else ''}, global batch {batch}, "
        f"run folder {trainer.default_root_dir}"
    )


def describe_results(trainer: Trainer, seconds: float) -> str:
    """One line: how the fit ended (epochs, steps, time, the last validation figures)."""
    shown = []
    for key, value in sorted(trainer.callback_metrics.items()):
        if key.startswith("val/"):
            v = float(value)
            shown.append(f"{key} {100 * v:.1f}%" if "top" in key else f"{key} {v:.4g}")
    last = newest_checkpoint(trainer.default_root_dir)
    return (
        f"selfsup fit: done, epoch {trainer.current_epoch}, step {trainer.global_step}, {seconds / 60:.1f} min"
        + (f"; {', '.join(shown)}" if shown else "")
        + (f"; checkpoint {last}" if last else "")
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``selfsup`` command; user errors print one line and exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_lightning()  # every subcommand: the pipeline's stages too
    keep_freed_memory()  # before the first large tensor (see selfsup.runtime)
    try:
        if not args or args[0] in ("-h", "--help"):
            print(usage(), end="")
        elif args[0] in COMMANDS:
            COMMANDS[args[0]][0](args[1:])
        else:
            # args=None lets Lightning read sys.argv itself (it warns when given both).
            SelfsupCLI(None if argv is None else args)
    except SIGTERMException:
        # Preempted or Ctrl-C: the checkpoint is written (RunCheckpoint said where); the
        # conventional status of a process ended by the signal tells the scheduler it did not finish.
        raise SystemExit(128 + stop_signal()) from None
    except KeyboardInterrupt:  # Ctrl-C before training started (or a second one): nothing to save
        print("selfsup: interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except Exception as e:
        # jsonargparse wraps errors raised while instantiating classes: find ours inside.
        err = find_selfsup_error(e)
        if err is None:
            raise
        print(f"selfsup: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
