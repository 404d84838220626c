"""``selfsup pipeline``: the three stages in order, measured on one fixed split.

1. random-init baseline: linear probe of an untrained backbone;
2. relative location pretraining, then its linear probe;
3. SimCLR pretraining, then its linear probe.

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
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger

from selfsup import SelfsupError
from selfsup.callbacks import LearningRateScaling, Warmup
from selfsup.config import ConfigErrorMixin
from selfsup.data import ImageDataModule
from selfsup.data.datamodule import BAD_FILES_NAME
from selfsup.methods import LinearProbe, RelativeLocation, SimCLR
from selfsup.models.backbones import build_backbone
from selfsup.tracking import WandbLogger, finish_wandb

BACKBONE_ARGS = {"backbone", "cifar_stem", "width", "norm"}
PRETRAIN = {"relative_location": RelativeLocation, "simclr": SimCLR}


class PipelineParser(ConfigErrorMixin, ArgumentParser):
    """Pipeline config parser; errors become one-line SelfsupErrors."""


def build_parser() -> ArgumentParser:
    p = PipelineParser(prog="selfsup pipeline", description=__doc__.splitlines()[0], default_meta=False)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file, e.g. configs/pipeline/quickstart.yaml")
    p.add_argument("--out", type=str, default="runs/pipeline", help="output folder")
    p.add_argument("--name", type=str, default="pipeline", help="run name (W&B group)")
    p.add_argument("--seed", type=int, default=0)
    p.add_class_arguments(ImageDataModule, "data")
    p.add_function_arguments(build_backbone, "backbone")
    p.add_argument("--trainer", type=dict[str, Any], default={}, help="Trainer arguments shared by every stage")
    p.add_class_arguments(LearningRateScaling, "lr_scaling")
    p.add_argument("--wandb.enabled", type=bool, default=True)
    p.add_argument("--wandb.project", type=str, default="selfsup")
    p.add_argument("--wandb.offline", type=bool | None, default=None, help="None: offline unless an account is set")
    for stage, cls in PRETRAIN.items():
        p.add_argument(f"--{stage}.enabled", type=bool, default=True, help="run this stage and its probe")
        p.add_argument(f"--{stage}.max_epochs", type=int, default=10)
        p.add_argument(f"--{stage}.max_time", type=float | None, default=None, help="budget in seconds")
        p.add_argument(f"--{stage}.probe_stages", type=list[int], default=[-2] if stage == "relative_location" else [],
                       help="earlier backbone stages to probe too (e.g. -2: ResNet layer3)")
        p.add_class_arguments(cls, f"{stage}.model", skip=BACKBONE_ARGS)
        p.add_class_arguments(Warmup, f"{stage}.warmup")
    p.add_argument("--probe.max_epochs", type=int, default=30)
    p.add_class_arguments(Warmup, "probe.warmup")
    p.add_class_arguments(LinearProbe, "probe.model",
                          skip=BACKBONE_ARGS | {"num_classes", "backbone_checkpoint", "input_norm", "feature_stage"})
    return p


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
        self.backbone_args = {"backbone": cfg.backbone.name, "cifar_stem": cfg.backbone.cifar_stem,
                              "width": cfg.backbone.width, "norm": cfg.backbone.norm}

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

    def pretrain(self, dm: ImageDataModule, stage: str) -> tuple[Path, dict[str, float]]:
        L.seed_everything(self.cfg.seed, verbose=False)
        scfg = getattr(self.cfg, stage)
        model = PRETRAIN[stage](**self.backbone_args, **_to_dict(scfg.model))
        trainer = self.trainer(stage, scfg.warmup, scfg.max_epochs, scfg.max_time, checkpoint=True)
        trainer.fit(model, datamodule=dm)
        extra: dict[str, float] = {}
        if stage == "relative_location":
            metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
            extra["pretext_top1"] = float(metrics["val/pretext_top1"])
        finish_wandb(trainer)  # the next stage gets a run of its own
        return self.out / stage / "checkpoints" / "last.ckpt", extra

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
        if cfg.relative_location.enabled:
            RelativeLocation(**self.backbone_args, **_to_dict(cfg.relative_location.model)).check_data(dm)
        results: dict[str, dict[str, float]] = {}

        t0 = time.time()
        random, _ = self.probe(labelled, "random", None, "channel")
        results["random"] = {**random, "seconds": time.time() - t0}

        for stage in PRETRAIN:
            if not getattr(cfg, stage).enabled:
                continue
            t0 = time.time()
            ckpt, extra = self.pretrain(dm, stage)
            # A relative-location backbone saw per-patch standardised inputs: probe it the same way.
            per_image = stage == "relative_location" and cfg.relative_location.model.per_patch_norm
            norm = "per_image" if per_image else "channel"
            probe, _ = self.probe(labelled, stage, ckpt, norm)
            # Earlier stages too: pretext tasks over-specialise the last one.
            for k in getattr(cfg, stage).probe_stages:
                metrics, index = self.probe(labelled, stage, ckpt, norm, k)
                extra[f"linear_top1_stage{index}"] = metrics["linear_top1"]
            results[stage] = {**extra, **probe, "seconds": time.time() - t0}

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

    names = {"random": "random init (baseline)", "relative_location": "relative location", "simclr": "SimCLR"}
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
