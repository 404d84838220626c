"""The ``selfsup`` command: the Lightning CLI (fit, validate, test) plus ``pipeline``.

    selfsup fit --config configs/trainer/cpu.yaml --config configs/simclr/cifar10.yaml
    selfsup pipeline --config configs/pipeline/quickstart.yaml [--data.root DIR] [--out DIR]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from selfsup import SelfsupError
from selfsup.callbacks import LearningRateScaling, Warmup
from selfsup.config import ConfigErrorMixin, find_selfsup_error
from selfsup.data import ImageDataModule
from selfsup.tracking import finish_wandb

USAGE = """usage: selfsup {fit,validate,test,pipeline,patches} [--config FILE ...] [--section.key VALUE ...]

  fit | validate | test   one stage through the Lightning CLI; the model is chosen by
                          class_path (selfsup.methods.RelativeLocation, SimCLR, LinearProbe,
                          FineTune); see `selfsup fit --help`
  pipeline                baseline probe, relative-location and SimCLR pretraining with their
                          probes, then OUT/summary.json and OUT/summary.md; see
                          `selfsup pipeline --help`
  patches                 draw the relative-location patch grids of a few images to a PNG
"""

#: Used when a config names no logger: a local CSV of metrics (first, so that config.yaml
#: and checkpoints land in its versioned folder) and W&B beside it, offline without an account.
DEFAULT_LOGGERS = [
    {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "selfsup"}},
    {"class_path": "selfsup.tracking.WandbLogger", "init_args": {"save_dir": "runs", "project": "selfsup"}},
]


class LoggedConfig(SaveConfigCallback):
    """Save config.yaml beside the run and log the full config as every logger's run config."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
        dm = trainer.datamodule
        # Rank zero only, so no trainer.log_dir here (a collective call): the folder was
        # resolved before the run started (SelfsupCLI._prepare_data).
        if isinstance(dm, ImageDataModule) and dm.run_dir is not None:
            dm.write_bad_files(dm.run_dir)


class SelfsupArgumentParser(ConfigErrorMixin, LightningArgumentParser):
    """Lightning's parser whose errors become one-line SelfsupErrors."""


class SelfsupCLI(LightningCLI):
    """Lightning CLI with selfsup's DataModule and any stage module chosen by class_path.

    Two callbacks are always on, configured in their own sections: ``lr_scaling`` (the rate
    follows the global batch) and ``warmup`` (linear warmup, then cosine or constant).
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            subclass_mode_model=True,
            datamodule_class=ImageDataModule,
            save_config_callback=LoggedConfig,
            trainer_defaults={"logger": DEFAULT_LOGGERS},
            seed_everything_default=0,
            parser_class=SelfsupArgumentParser,
            args=list(args) if args is not None else None,
            run=run,
        )
        if run:
            finish_wandb(self.trainer)

    def _prepare_data(self) -> None:
        """Decode the data (or read the job's cache), report and check it before the Trainer
        starts any logger or process: a stop for bad files, missing labels or too small images
        leaves no half-started run behind. Under DDP every process gets here; the first to
        need a decoded set builds it, the others read it (see ``selfsup.data.sources``)."""
        dm = self.datamodule
        if not isinstance(dm, ImageDataModule):
            return
        dm.trainer = self.trainer  # its world size decides whether the decoded set is shared
        if rank_zero_only.rank == 0:
            # bad_files.txt goes beside config.yaml; LoggedConfig writes it once the logger has
            # made the folder (a file there before would make the CSV logger warn).
            dm.run_dir, dm.defer_bad_files = self.trainer.log_dir, True
        dm.setup("fit")
        check = getattr(self.model, "check_data", None)
        if check is not None:
            check(dm)

    def before_fit(self) -> None:
        self._prepare_data()

    def before_validate(self) -> None:
        self._prepare_data()

    def before_test(self) -> None:
        self._prepare_data()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LearningRateScaling, "lr_scaling")
        parser.add_lightning_class_args(Warmup, "warmup")
        # The class count comes from the data (a folder listing, nothing decoded) into every
        # module that takes one, before the module is built: heads exist from __init__ on.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``selfsup`` command; user errors print one line and exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if not args or args[0] in ("-h", "--help"):
            print(USAGE, end="")
            return
        if args[0] == "pipeline":
            from selfsup.pipeline import pipeline_main

            pipeline_main(args[1:])
        elif args[0] == "patches":
            from selfsup.visualize import patches_main

            patches_main(args[1:])
        else:
            # args=None lets Lightning read sys.argv itself (it warns when given both).
            SelfsupCLI(None if argv is None else args)
    except Exception as e:
        # jsonargparse wraps errors raised while instantiating classes: find ours inside.
        err = find_selfsup_error(e)
        if err is None and isinstance(e, ValueError) and "SLURM" in str(e):
            # Lightning's check that the Trainer matches the SLURM allocation; without it the
            # job hangs (Lightning #19883). One line, with the fix.
            err = SelfsupError(f"{e} Run one task per device: --ntasks-per-node equal to trainer.devices "
                               "and --nodes equal to trainer.num_nodes (see scripts/slurm/).")
        if err is None:
            raise
        print(f"selfsup: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
