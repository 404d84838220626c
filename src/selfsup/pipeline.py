"""``selfsup pipeline``: pretraining stages in order, each probed, measured on one fixed split.

1. random-init baseline: linear probe of an untrained backbone;
2. each stage of ``stages`` in order (a name, the ``selfsup fit`` config that describes it,
   overrides): pretraining, then linear probes of its backbone at the chosen depths.

A stage's model and warmup come from its fit config (``configs/<method>/<dataset>.yaml``); the
pipeline's shared sections (``data``, ``backbone``, ``trainer``, ``lr_scaling``) apply to every
stage, and the stage's own entries (``model``, ``warmup``, epochs) override both.

Pretraining reads ``data.root`` (labelled or not); the probes train and evaluate on the labelled
evaluation data: ``data.eval_root`` when given, else ``data.root``'s own labels.

Writes ``OUT/summary.json`` and ``OUT/summary.md`` (also printed), checkpoints under
``OUT/<stage>/checkpoints/last.ckpt``, metrics under ``OUT/<stage>/metrics.csv``,
W&B runs (one per stage, grouped) under ``OUT/wandb`` and the files that could not be decoded
in ``OUT/bad_files.txt``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger

from selfsup import SelfsupError
from selfsup.callbacks import LearningRateScaling, Warmup
from selfsup.config import ConfigErrorMixin
from selfsup.data import ImageDataModule
from selfsup.data.datamodule import BAD_FILES_NAME
from selfsup.methods import LinearProbe
from selfsup.models.backbones import BackboneSpec
from selfsup.tracking import WandbLogger, finish_wandb

DISPLAY_NAMES = {"random": "random init (baseline)", "relative_location": "relative location", "simclr": "SimCLR",
                 "moco": "MoCo"}


@dataclass
class Stage:
    """One pretraining stage of a pipeline.

    Args:
        config: a ``selfsup fit`` config (e.g. ``configs/simclr/cifar10.yaml``): its ``model``
            (class_path and init_args) and ``warmup`` sections describe the stage. A relative
            path is read from the working directory, else from the pipeline config's folders.
        model: init_args that override the config's (the shared ``backbone`` applies first).
        warmup: Warmup arguments that override the config's.
        max_epochs / max_time: the stage's budget (max_time in seconds).
        probe_stages: earlier backbone stages to probe too (e.g. -2: ResNet layer3), besides the last.
        enabled: run this stage and its probes.
    """

    config: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    warmup: dict[str, Any] = field(default_factory=dict)
    max_epochs: int = 10
    max_time: float | None = None
    probe_stages: list[int] = field(default_factory=list)
    enabled: bool = True


class PipelineParser(ConfigErrorMixin, ArgumentParser):
    """Pipeline config parser; errors become one-line SelfsupErrors."""


def build_parser() -> ArgumentParser:
    p = PipelineParser(prog="selfsup pipeline", description=__doc__.splitlines()[0], default_meta=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file, e.g. configs/pipeline/quickstart.yaml")
    p.add_argument("--out", type=str, default="runs/pipeline", help="output folder")
    p.add_argument("--name", type=str, default="pipeline", help="run name (W&B group)")
    p.add_argument("--seed", type=int, default=0)
    p.add_class_arguments(ImageDataModule, "data")
    p.add_class_arguments(BackboneSpec, "backbone")
    p.add_argument("--trainer", type=dict[str, Any], default={}, help="Trainer arguments shared by every stage")
    p.add_class_arguments(LearningRateScaling, "lr_scaling")
    p.add_argument("--wandb.enabled", type=bool, default=True)
    p.add_argument("--wandb.project", type=str, default="selfsup")
    p.add_argument("--wandb.offline", type=bool | None, default=None, help="None: offline unless an account is set")
    p.add_argument("--stages", type=dict[str, Stage], default={},
                   help="pretraining stages in order, by name, e.g. --stages.simclr.max_epochs 5")
    p.add_argument("--probe.max_epochs", type=int, default=30)
    p.add_class_arguments(Warmup, "probe.warmup")
    p.add_class_arguments(LinearProbe, "probe.model",
                          skip={"backbone", "num_classes", "backbone_checkpoint", "input_norm", "feature_stage"})
    return p


def _find_config(path: str, near: list[Path]) -> Path:
    """A stage's fit config: as given (from the working directory), else relative to the folders
    of the pipeline config files and their parents (configs/pipeline/x.yaml names
    configs/simclr/y.yaml)."""
    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    for base in near:
        for d in (base, *base.parents):
            if (d / p).is_file():
                return d / p
    return p


def stage_model(name: str, stage: Namespace, backbone: dict[str, Any], near: list[Path]) -> tuple[LightningModule, dict]:
    """Build a stage's module from its fit config and overrides; return it and the warmup
    arguments. The module is type-checked by the same parser machinery as ``selfsup fit``."""
    if stage.config is None:
        raise SelfsupError(f"stage {name} names no config: give stages.{name}.config, a selfsup fit config "
                           "such as configs/simclr/cifar10.yaml")
    path = _find_config(stage.config, near)
    if not path.is_file():
        raise SelfsupError(f"stage {name}: config not found: {stage.config}")
    fit = yaml.safe_load(path.read_text()) or {}
    model = fit.get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise SelfsupError(f"stage {name}: {path} has no model.class_path")
    init = {**(model.get("init_args") or {}), **backbone, **stage.model}
    parser = PipelineParser(prog=f"selfsup pipeline (stage {name})")
    parser.add_subclass_arguments(LightningModule, "model")
    cfg = parser.parse_object({"model": {"class_path": model["class_path"], "init_args": init}})
    module = parser.instantiate_classes(cfg).model
    return module, {**(fit.get("warmup") or {}), **stage.warmup}


def _to_dict(ns: Namespace) -> dict[str, Any]:
    d = ns.as_dict()
    d.pop("config", None)
    d.pop("__path__", None)
    return d


class Pipeline:
    """Runs the stages with one DataModule, so every stage sees the same split."""

    def __init__(self, cfg: Namespace) -> None:
        self.cfg = cfg
        self.config = _to_dict(cfg)
        self.out = Path(cfg.out)
        # The shared backbone, as every stage module takes it (replacing its config's).
        self.backbone_args = {"backbone": BackboneSpec.of(_to_dict(cfg.backbone)).as_dict()}
        # Where a stage's relative config path may be found besides the working directory.
        self.config_dirs = [Path(str(c)).parent for c in (cfg.get("config") or []) if c is not None]

    def trainer(self, stage: str, warmup: Namespace, max_epochs: int, max_time: float | None = None,
                checkpoint: bool = False) -> L.Trainer:
        cfg = self.cfg
        loggers: list[Logger] = [CSVLogger(str(self.out), name=stage, version="")]
        if cfg.wandb.enabled:
            loggers.append(WandbLogger(project=cfg.wandb.project, name=f"{cfg.name}-{stage}", group=cfg.name,
                                       save_dir=str(self.out), offline=cfg.wandb.offline, job_type=stage))
        for lg in loggers:
            lg.log_hyperparams({"pipeline": self.config, "stage": stage})
        callbacks: list[L.Callback] = [TQDMProgressBar(refresh_rate=10), LearningRateScaling(**_to_dict(cfg.lr_scaling)),
                                       Warmup(**_to_dict(warmup))]
        if checkpoint:
            callbacks.append(ModelCheckpoint(dirpath=self.out / stage / "checkpoints", filename="last",
                                             enable_version_counter=False))
        kwargs = {"accelerator": "auto", "devices": 1, "log_every_n_steps": 10, "enable_model_summary": False,
                  **cfg.trainer}
        try:
            return L.Trainer(max_epochs=max_epochs, max_time={"seconds": max_time} if max_time else None,
                             logger=loggers, callbacks=callbacks, enable_checkpointing=checkpoint,
                             default_root_dir=str(self.out / stage), **kwargs)
        except TypeError as e:
            raise SelfsupError(f"bad trainer setting in the pipeline config: {e}") from None

    def probe(self, dm: ImageDataModule, stage: str, checkpoint: Path | None, input_norm: str,
              feature_stage: int = -1) -> tuple[dict[str, float], int]:
        """Linear probe of a backbone at ``feature_stage``: (top-1/top-5 metrics, stage index)."""
        L.seed_everything(self.cfg.seed, verbose=False)
        model = LinearProbe(num_classes=dm.num_classes, backbone_checkpoint=str(checkpoint) if checkpoint else None,
                            input_norm=input_norm, feature_stage=feature_stage, **self.backbone_args,
                            **_to_dict(self.cfg.probe.model))
        index = feature_stage % model.backbone.num_stages
        name = f"{stage}_probe" if feature_stage == -1 else f"{stage}_probe_stage{index}"
        trainer = self.trainer(name, self.cfg.probe.warmup, self.cfg.probe.max_epochs)
        trainer.fit(model, datamodule=dm)
        metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
        finish_wandb(trainer)  # the next stage gets a run of its own
        top5 = float(metrics["val/top5"]) if model.top_k == 5 else None  # None: 5 classes or fewer
        return {"linear_top1": float(metrics["val/top1"]), "linear_top5": top5}, index

    def build(self, name: str) -> tuple[LightningModule, dict]:
        """A stage's module (seeded, so each stage starts from the same initialisation stream)."""
        L.seed_everything(self.cfg.seed, verbose=False)
        return stage_model(name, self.cfg.stages[name], self.backbone_args, self.config_dirs)

    def pretrain(self, dm: ImageDataModule, name: str) -> tuple[Path, LightningModule, dict[str, float]]:
        model, warmup = self.build(name)
        scfg = self.cfg.stages[name]
        trainer = self.trainer(name, Namespace(**warmup), scfg.max_epochs, scfg.max_time, checkpoint=True)
        trainer.fit(model, datamodule=dm)
        extra: dict[str, float] = {}
        metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
        if "val/pretext_top1" in metrics:  # a pretext task with classes of its own
            extra["pretext_top1"] = float(metrics["val/pretext_top1"])
        finish_wandb(trainer)  # the next stage gets a run of its own
        return self.out / name / "checkpoints" / "last.ckpt", model, extra

    def run(self) -> dict[str, Any]:
        t_start = time.time()
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        dm = ImageDataModule(**_to_dict(cfg.data))
        dm.run_dir = str(self.out)
        # Every check before the first stage: a stop leaves no half-run pipeline behind.
        dm.setup("fit")
        labelled = dm.evaluation_data
        if labelled is None:
            raise SelfsupError(
                f"the pipeline's probes need labelled images, but {cfg.data.root} has none (data.labels="
                f"{cfg.data.labels}); give labelled evaluation data with --data.eval_root DIR (DIR/<class>/<image>)"
            )
        stages = [name for name, st in cfg.stages.items() if st.enabled]
        for name in stages:  # every stage's config parses and fits the data before anything trains
            model, _ = stage_model(name, cfg.stages[name], self.backbone_args, self.config_dirs)
            check = getattr(model, "check_data", None)
            if check is not None:
                check(dm)
        results: dict[str, dict[str, float]] = {}

        t0 = time.time()
        random, _ = self.probe(labelled, "random", None, "channel")
        results["random"] = {**random, "seconds": time.time() - t0}

        for name in stages:
            t0 = time.time()
            ckpt, model, extra = self.pretrain(dm, name)
            # Probe with the inputs the backbone was trained on (per-patch standardised for
            # relative location).
            norm = getattr(model, "probe_input_norm", "channel")
            probe, _ = self.probe(labelled, name, ckpt, norm)
            # Earlier stages too: pretext tasks over-specialise the last one.
            for k in cfg.stages[name].probe_stages:
                metrics, index = self.probe(labelled, name, ckpt, norm, k)
                extra[f"linear_top1_stage{index}"] = metrics["linear_top1"]
            results[name] = {**extra, **probe, "seconds": time.time() - t0}

        def where(root: str | None) -> str:
            return str(Path(root).expanduser().resolve()) if root else "(embedded sample)"

        summary = {
            "data_root": where(cfg.data.root),
            "eval_root": where(cfg.data.eval_root) if cfg.data.eval_root else where(cfg.data.root),
            "labels": "folders" if dm.has_labels else "none",
            "image_size": dm.image_size,
            "num_classes": labelled.num_classes,
            "pretrain_images": len(dm.train_set),
            "train_images": len(labelled.train_set),
            "eval_images": len(labelled.eval_set),
            "images": {**dm.image_counts, "skipped_list": BAD_FILES_NAME if dm.image_counts["skipped"] else None},
            "backbone": cfg.backbone.name,
            "results": results,
            "wall_seconds": time.time() - t_start,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        table = summary_markdown(summary, labelled.eval_split)
        (self.out / "summary.md").write_text(table)
        print("\n" + table)
        return summary


def summary_markdown(s: dict[str, Any], eval_split: str = "") -> str:
    """The summary as a Markdown table; accuracies in percent."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    names = DISPLAY_NAMES
    separate = s.get("eval_root", s["data_root"]) != s["data_root"]
    counts = s.get("images", {})
    lines = [
        f"# selfsup pipeline: {s['data_root']}",
        "",
        *([f"Pretrained on {s['pretrain_images']} images of {s['data_root']} ({'labelled' if s['labels'] == 'folders' else 'unlabeled'}); "
           f"evaluated on {s['eval_root']}.", ""] if separate else []),
        f"{s['train_images']} train / {s['eval_images']} eval images{f' ({eval_split})' if eval_split else ''}, "
        f"{s['image_size']} px, {s['num_classes']} classes, backbone {s['backbone']}; "
        f"accuracies on the eval split; {s['wall_seconds']:.0f} s in all."
        + (f" {counts['skipped']} unreadable files skipped ({counts['skipped_list']})." if counts.get("skipped") else ""),
        "",
        "| backbone from | pretext top-1 | linear top-1 | linear top-5 | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    notes = []
    for key, r in s["results"].items():
        lines.append(f"| {names.get(key, key)} | {pct(r.get('pretext_top1'))} | {pct(r['linear_top1'])} | "
                     f"{pct(r['linear_top5'])} | {r['seconds']:.0f} |")
        by_stage = [f"stage {k.removeprefix('linear_top1_stage')} {pct(v)}" for k, v in r.items()
                    if k.startswith("linear_top1_stage")]
        if by_stage:
            notes.append(f"{names.get(key, key)}, linear top-1 from earlier backbone stages: {', '.join(by_stage)}.")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def pipeline_main(argv: Sequence[str]) -> dict[str, Any]:
    cfg = build_parser().parse_args(list(argv))
    return Pipeline(cfg).run()
