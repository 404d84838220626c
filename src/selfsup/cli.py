"""The ``selfsup`` command: the Lightning CLI (fit, validate, test) plus ``pipeline``.

    selfsup fit --config configs/trainer/cpu.yaml --config configs/simclr/cifar10.yaml
    selfsup pipeline --config configs/pipeline/quickstart.yaml [--data.root DIR] [--out DIR]
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from selfsup import SelfsupError
from selfsup.callbacks import LearningRateScaling, Warmup
from selfsup.callbacks.lr import global_batch_size
from selfsup.callbacks.run import (
    CollapseWatch,
    LossGuard,
    RandomState,
    RunCheckpoint,
    newest_checkpoint,
)
from selfsup.config import ConfigErrorMixin, find_selfsup_error
from selfsup.data import ImageDataModule
from selfsup.data.datamodule import say
from selfsup.quiet import quiet_lightning
from selfsup.runtime import keep_freed_memory
from selfsup.tracking import finish_wandb, wandb_run_id

#: ``save_dir`` of the default loggers until the run folder is known.
RUN_DIR_PLACEHOLDER = "<run folder>"

USAGE = """usage: selfsup {fit,validate,test,pipeline,export,data,patches} [--config FILE ...] [--section.key VALUE ...]

  fit | validate | test   one stage through the Lightning CLI; the model is chosen by
                          class_path (selfsup.methods.RelativeLocation, SimCLR, LinearProbe,
                          FineTune); see `selfsup fit --help`
  pipeline                baseline probe, relative-location and SimCLR pretraining with their
                          probes, then OUT/summary.json and OUT/summary.md; see
                          `selfsup pipeline --help`
  export                  a checkpoint's backbone as torchvision / timm / plain weights,
                          with a JSON that says what it is; see `selfsup export --help`
  data optimize           an image folder's splits as LitData chunks of encoded images
                          (--src ROOT --out DIR); see `selfsup data optimize --help`
  patches                 draw the relative-location patch grids of a few images to a PNG
"""

#: Used when a config names no logger: a CSV of metrics (first: its folder is the run folder,
#: where config.yaml and checkpoints go) and W&B beside it, offline without an account. Both
#: are pointed at the run folder (``trainer.default_root_dir``) before they are built.
DEFAULT_LOGGERS = [
    {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": RUN_DIR_PLACEHOLDER}},
    {"class_path": "selfsup.tracking.WandbLogger", "init_args": {"save_dir": RUN_DIR_PLACEHOLDER, "project": "selfsup"}},
]


class LoggedConfig(SaveConfigCallback):
    """Save config.yaml in the run folder (replacing an earlier attempt's: a resumed run is the
    same run) and log the full config as every logger's run config."""

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

    Every run lives in one folder, ``trainer.default_root_dir`` (default ``runs/<method>``):
    config.yaml, metrics.csv, ``checkpoints/last.ckpt``, the W&B offline files, figures and the
    bad-file list; no version counter. Re-running a command continues its run from the newest
    checkpoint there (``--fresh true`` starts again; ``--ckpt_path last`` says it explicitly).

    Callbacks always on, configured in their own sections: ``lr_scaling`` (the rate follows the
    global batch), ``warmup`` (linear warmup, then cosine or constant) and ``checkpoint`` (how
    often ``last.ckpt`` is written); and the guards: the random stream saved with checkpoints,
    a stop at the first non-finite loss, a warning when the representation collapses.
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        quiet_lightning()
        self._started = time.time()
        super().__init__(
            model_class=LightningModule,
            subclass_mode_model=True,
            datamodule_class=ImageDataModule,
            save_config_callback=LoggedConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"logger": DEFAULT_LOGGERS},
            seed_everything_default=0,
            parser_class=SelfsupArgumentParser,
            args=list(args) if args is not None else None,
            run=run,
        )
        if run:
            finish_wandb(self.trainer)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.extend([RandomState(), LossGuard(), CollapseWatch()])
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Trainer:
        if config.get("enable_checkpointing") is False:  # asked for none: no RunCheckpoint either
            callbacks = [c for c in callbacks if not isinstance(c, RunCheckpoint)]
        return super()._instantiate_trainer(config, callbacks)

    # -- the run folder ------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        """Settle the run folder and point the default loggers at it, before anything is built."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        model = str(cfg.model.class_path).rsplit(".", 1)[-1] if cfg.get("model") else "run"
        if cfg.trainer.default_root_dir is None:
            cfg.trainer.default_root_dir = str(Path("runs") / model.lower())
        root = Path(cfg.trainer.default_root_dir)
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else []
        for lg in loggers:
            args = lg.init_args
            if args.get("save_dir") != RUN_DIR_PLACEHOLDER:
                continue
            args.save_dir = str(root)
            if str(lg.class_path).endswith("CSVLogger"):
                args.name, args.version = "", ""  # metrics.csv directly in the run folder
            else:  # W&B: one run per folder, continued when the folder's run resumes
                args.name = args.get("name") or root.name
                args.id = args.get("id") or wandb_run_id(root)
                args.resume = "allow"

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

    def _resume_from(self) -> str | None:
        """The checkpoint this fit continues from: ``--ckpt_path`` as given, else (unless
        ``--fresh``) the newest in the run folder, after checking it is this run's."""
        sub = self.config_init[self.subcommand]
        given = sub.get("ckpt_path")
        root = Path(self.trainer.default_root_dir)
        if given not in (None, "last"):
            return given
        if given is None and self.config[self.subcommand].get("fresh"):
            say(f"starting afresh in {root} (--fresh): its earlier checkpoints are overwritten as this run saves")
            return None
        ckpt = newest_checkpoint(root)
        if ckpt is None:
            if given == "last":
                say(f"no checkpoint in {root} yet: training from the start")
            return None
        same_run_or_stop(root, self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False))
        say(f"resuming the run in {root} from {ckpt} (--fresh true starts again)")
        return str(ckpt)

    def before_fit(self) -> None:
        self._prepare_data()
        self.config_init[self.subcommand]["ckpt_path"] = self._resume_from()
        say(describe_run(self.model, self.datamodule, self.trainer))

    def after_fit(self) -> None:
        say(describe_results(self.trainer, time.time() - self._started))

    def before_validate(self) -> None:
        self._prepare_data()

    def before_test(self) -> None:
        self._prepare_data()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LearningRateScaling, "lr_scaling")
        parser.add_lightning_class_args(Warmup, "warmup")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_argument("--fresh", type=bool, default=False,
                            help="start the run again instead of continuing from the run folder's checkpoint")
        # The class count comes from the data (a folder listing, nothing decoded) into every
        # module that takes one, before the module is built: heads exist from __init__ on.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


#: Data settings that change how a run loads its images, not what it learns: a resumed run may differ in them.
HOW_NOT_WHAT = {"num_workers", "decode_workers", "cache_dir", "cache_min_images", "eval_batch_size", "download"}


def same_run_or_stop(root: Path, config_yaml: str) -> None:
    """Stop with one line when the run folder holds a run whose model or data differ from this
    command's: continuing it would mix two experiments."""
    saved = root / "config.yaml"
    if not saved.is_file():
        return
    old, new = yaml.safe_load(saved.read_text()) or {}, yaml.safe_load(config_yaml) or {}
    changed = [f"{section}.{k}" for section in ("model", "data")
               for k in sorted(set(old.get(section) or {}) | set(new.get(section) or {}))
               if k not in HOW_NOT_WHAT and (old.get(section) or {}).get(k) != (new.get(section) or {}).get(k)]
    if changed:
        raise SelfsupError(
            f"{root} holds a run with another config ({', '.join(changed[:4])} differ{'s' if len(changed) == 1 else ''}); "
            "continue it with its own config, start it again with --fresh true, or give this run "
            "its own folder with --trainer.default_root_dir"
        )


def describe_run(model: LightningModule, dm: object, trainer: Trainer) -> str:
    """One line: what this fit does (method, data, images, devices, global batch, folder)."""
    method = type(model).__name__
    if not isinstance(dm, ImageDataModule) or dm.train_set is None:
        return f"selfsup fit: {method}, run folder {trainer.default_root_dir}"
    where = dm.hparams.root or "the embedded sample"
    labels = f"{dm.num_classes} classes" if dm.has_labels else "unlabeled"
    batch = global_batch_size(trainer, dm.hparams.batch_size)
    devices = trainer.world_size
    return (f"selfsup fit: {method} on {where} ({len(dm.train_set):,} train / {len(dm.eval_set):,} eval images, "
            f"{labels}, {dm.image_size} px), {devices} device{'s' if devices > 1 else ''}, global batch {batch}, "
            f"run folder {trainer.default_root_dir}")


def describe_results(trainer: Trainer, seconds: float) -> str:
    """One line: how the fit ended (epochs, steps, time, the last validation figures)."""
    shown = []
    for key, value in sorted(trainer.callback_metrics.items()):
        if key.startswith("val/"):
            v = float(value)
            shown.append(f"{key} {100 * v:.1f}%" if "top" in key else f"{key} {v:.4g}")
    last = newest_checkpoint(trainer.default_root_dir)
    return (f"selfsup fit: done, epoch {trainer.current_epoch}, step {trainer.global_step}, {seconds / 60:.1f} min"
            + (f"; {', '.join(shown)}" if shown else "") + (f"; checkpoint {last}" if last else ""))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``selfsup`` command; user errors print one line and exit 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    quiet_lightning()  # every subcommand: the pipeline's stages too
    keep_freed_memory()  # before the first large tensor (see selfsup.runtime)
    try:
        if not args or args[0] in ("-h", "--help"):
            print(USAGE, end="")
            return
        if args[0] == "pipeline":
            from selfsup.pipeline import pipeline_main

            pipeline_main(args[1:])
        elif args[0] == "export":
            from selfsup.export import export_main

            export_main(args[1:])
        elif args[0] == "data":
            from selfsup.data.stream import data_main

            data_main(args[1:])
        elif args[0] == "patches":
            from selfsup.visualize import patches_main

            patches_main(args[1:])
        else:
            # args=None lets Lightning read sys.argv itself (it warns when given both).
            SelfsupCLI(None if argv is None else args)
    except SIGTERMException:
        # Preempted: the checkpoint is written (RunCheckpoint said where); the conventional
        # status of a process ended by SIGTERM tells the scheduler it did not finish.
        raise SystemExit(128 + signal.SIGTERM) from None
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
