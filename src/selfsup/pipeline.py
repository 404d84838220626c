"""``selfsup pipeline``: pretraining stages in order, each evaluated, measured on one fixed split.

The pipeline is two ordered lists of stages, each described by a ``selfsup fit`` config
(``configs/<method>/<dataset>.yaml``: its ``model`` and ``warmup`` sections) plus overrides:

- ``stages``: pretraining (relative location, SimCLR, MoCo, BYOL, VICReg, DINO, MAE, any stage module);
- ``evaluations``: run on every backbone, the untrained one first (the ``baseline`` entry,
  ``random``) and each pretraining stage's at the depths it names (``probe_depths``); the
  linear probe (``configs/linear_probe/...``) is the one the configs ship with.

The pipeline's shared sections (``data``, ``backbone``, ``trainer``, ``lr_scaling``) apply to
every stage, and a stage's own entries (``model``, ``warmup``, epochs) override both. The class
count comes from the data; an evaluation also gets the checkpoint, depth and input
normalization of the backbone it evaluates (its ``features`` section).

Pretraining reads ``data.root`` (labeled or not); evaluations train and measure on the labeled
evaluation data: ``data.eval_root`` when given, else ``data.root``'s own labels. With both (an
``eval_root`` and a labeled ``root``) every evaluation runs on each, side by side: transfer
(``linear_top1``: on ``eval_root``) and in-domain (``linear_indomain_top1``: on ``root``'s own
held-apart split); ``--in_domain false`` leaves the in-domain ones out.

Writes ``OUT/summary.json`` and ``OUT/summary.md`` (also printed), checkpoints under
``OUT/<stage>/checkpoints/last.ckpt``, metrics under ``OUT/<stage>/metrics.csv``,
W&B runs (one per stage, grouped) under ``OUT/wandb`` and the files that could not be decoded
in ``OUT/bad_files.txt``.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from selfsup import SelfsupError
from selfsup.callbacks import LearningRateScaling, ProgressBar, RunCheckpoint, Warmup
from selfsup.config import NON_NEGATIVE, POSITIVE, ConfigErrorMixin, check_ranges
from selfsup.console import first_process, say
from selfsup.data.datamodule import ImageDataModule
from selfsup.data.report import BAD_FILES_NAME
from selfsup.evaluation import FineTune
from selfsup.evaluation.features import Features, InputNorm, embed_all, frozen_features
from selfsup.evaluation.online import rankme_images
from selfsup.evaluation.verdict import rank_by_rankme, verdict
from selfsup.export import Format, natural_format, write_export
from selfsup.files import hold_folder, release_folder, write_atomic
from selfsup.metrics import rankme
from selfsup.models.backbones import AnyBackbone, BackboneSpec
from selfsup.models.weights import load_backbone
from selfsup.protocols import ChecksData, ProbeInputNorm, RecordsCorrect
from selfsup.run import (
    add_run_arguments,
    newest_checkpoint,
    run_callbacks,
    run_loggers,
    run_plugins,
    same_run_or_stop,
)
from selfsup.tracking import finish_wandb

DISPLAY_NAMES = {
    "random": "random init (baseline)",
    "start": "the start (your weights)",
    "distill": "distillation",
    "relative_location": "relative location",
    "simclr": "SimCLR",
    "moco": "MoCo",
    "byol": "BYOL",
    "vicreg": "VICReg",
    "dino": "DINO",
    "mae": "MAE",
}


class StageClock(L.Callback):
    """Seconds a stage has run, kept in its checkpoints: a stage continued after a kill counts the
    time of its earlier runs up to their last checkpoint, so its row does not show the rerun alone."""

    def __init__(self) -> None:
        self.before = 0.0  # seconds of earlier runs, from the checkpoint the stage continued from
        self.t0 = time.monotonic()

    def seconds(self) -> float:
        return self.before + time.monotonic() - self.t0

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict.get("seconds", 0.0))


@dataclass
class Stage:
    """One stage of a pipeline: pretraining (``stages``) or evaluation (``evaluations``).

    Args:
        config: a ``selfsup fit`` config (e.g. ``configs/simclr/cifar10.yaml``): its ``model``
            (class_path and init_args) and ``warmup`` sections describe the stage. A relative
            path is read from the working directory, else from the pipeline config's folders.
        model: init_args that override the config's (merged key by key into nested sections,
            e.g. ``optimizer: {lr: 0.1}`` keeps the config's optimizer name).
        warmup: Warmup arguments that override the config's.
        max_epochs / max_time: the stage's budget (max_time in seconds); 0 epochs: an evaluation
            that trains nothing (kNN) is only validated.
        probe_depths: of a pretraining stage: earlier backbone depths to evaluate too (e.g. -2:
            ResNet layer3), besides the last; ``probe_stages``: their name before selfsup 0.2.
        enabled: run this stage (and, for pretraining, its evaluations).
        data: of an evaluation: ``label_fraction`` (train on a class-balanced, seeded share of the
            labels, the same for every backbone) and ``batch_size``.
        start_from: of a pretraining stage: the backbone it starts from: an earlier stage's name
            (its trained backbone), ``start`` (the shared ``backbone.weights``) or ``random``
            (random initialization even when the others start from weights). None: the stage's own
            ``model.backbone.weights`` (a file, or an earlier stage's name), else the shared one.
            A distillation's ``model.teacher.weights`` may name ``start`` or an earlier stage too.
    """

    config: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    warmup: dict[str, Any] = field(default_factory=dict)
    max_epochs: int = 10
    max_time: float | None = None
    probe_depths: list[int] = field(default_factory=list)
    probe_stages: list[int] | None = None
    enabled: bool = True
    data: dict[str, Any] = field(default_factory=dict)
    start_from: str | None = None


#: Entries of the summary that are not stages: random initialization and the starting weights.
RANDOM, START = "random", "start"
#: The folder of the verdict's exported backbone, and the per-image results of an evaluation run.
BEST, CORRECT = "best", "correct.pt"


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
    p.add_argument(
        "--stages",
        type=dict[str, Stage],
        default={},
        help="pretraining stages in order, by name, e.g. --stages.simclr.max_epochs 5",
    )
    p.add_argument(
        "--evaluations",
        type=dict[str, Stage],
        default={},
        help="evaluation stages run on every backbone, by name (linear: the linear probe), "
        "e.g. --evaluations.linear.max_epochs 30",
    )
    p.add_argument(
        "--in_domain",
        type=bool,
        default=True,
        help="with data.eval_root and a labeled data.root, evaluate on data.root's own labels too "
        "(in-domain figures beside the transfer ones)",
    )
    p.add_argument(
        "--baseline",
        type=str | None,
        default="random",
        help="the entry of the untrained backbone's evaluations; null: none",
    )
    p.add_argument(
        "--export",
        type=Format | None,
        default=None,
        help="the format the verdict's best backbone is exported in to OUT/best/ (torchvision, timm, plain); "
        "None: the backbone's natural one",
    )
    add_run_arguments(p, "run every stage again instead of keeping finished ones and resuming the interrupted one")
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


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` on top, nested sections merged key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def stage_model(
    name: str, stage: Namespace, shared: dict[str, Any], near: list[Path], num_classes: int | None = None
) -> tuple[LightningModule, dict]:
    """Build a stage's module from its fit config, the shared sections and the stage's
    overrides (in that order); return it and the warmup arguments. The module is type-checked
    by the same parser machinery as ``selfsup fit``, and ``num_classes`` is linked into it as
    ``selfsup fit`` links the DataModule's (where the module takes one)."""
    if stage.config is None:
        raise SelfsupError(
            f"stage {name} names no config: give stages.{name}.config, a selfsup fit config "
            "such as configs/simclr/cifar10.yaml"
        )
    path = _find_config(stage.config, near)
    if not path.is_file():
        raise SelfsupError(f"stage {name}: config not found: {stage.config}")
    fit = yaml.safe_load(path.read_text()) or {}
    model = fit.get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise SelfsupError(f"stage {name}: {path} has no model.class_path")
    init = merge(merge(model.get("init_args") or {}, shared), stage.model)
    parser = PipelineParser(prog=f"selfsup pipeline (stage {name})")
    parser.add_subclass_arguments(LightningModule, "model")
    parser.add_argument("--num_classes", type=int | None, default=None)
    parser.link_arguments("num_classes", "model.init_args.num_classes", apply_on="parse")
    cfg = parser.parse_object(
        {"model": {"class_path": model["class_path"], "init_args": init}, "num_classes": num_classes}
    )
    module = parser.instantiate_classes(cfg).model
    return module, merge(fit.get("warmup") or {}, stage.warmup)


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
        self.shared = {"backbone": BackboneSpec.of(_to_dict(cfg.backbone)).as_dict()}
        # Where a stage's relative config path may be found besides the working directory.
        self.config_dirs = [Path(str(c)).parent for c in (cfg.get("config") or []) if c is not None]
        self._evaluation_data: dict[tuple[str, str], ImageDataModule] = {}
        # Per evaluation, each backbone's per-image results on the evaluation data (the verdict's input).
        self.correct: dict[str, dict[str, torch.Tensor]] = {}
        # Per-image results of the evaluation runs of this process: run -> bool (N,).
        self.correct_of: dict[str, torch.Tensor] = {}
        # Pretraining stages that start from an earlier stage's backbone: stage -> that stage.
        self.parents: dict[str, str] = {}
        # Distillation stages whose teacher is an earlier stage's backbone: stage -> that stage.
        self.teachers: dict[str, str] = {}
        # Seconds that stages kept or continued from an earlier run of this --out took there.
        self.earlier_seconds = 0.0

    def seconds(self) -> float:
        """A clock that counts, besides this run, what stages kept or continued from earlier runs took."""
        return time.time() + self.earlier_seconds

    def trainer(
        self,
        stage: str,
        warmup: dict,
        max_epochs: int,
        max_time: float | None = None,
        checkpoint: bool = False,
        clock: StageClock | None = None,
    ) -> L.Trainer:
        cfg = self.cfg
        folder = self.out / stage
        loggers = run_loggers(
            folder,
            wandb=cfg.wandb.enabled,
            name=f"{cfg.name}-{stage}",
            project=cfg.wandb.project,
            wandb_dir=self.out,
            group=cfg.name,
            job_type=stage,
            offline=cfg.wandb.offline,
        )
        for lg in loggers:
            lg.log_hyperparams({"pipeline": self.config, "stage": stage})
        # Pretraining stages are resumable (evaluations are short and start again).
        run = run_callbacks(
            LearningRateScaling(**_to_dict(cfg.lr_scaling)),
            Warmup(**warmup),
            RunCheckpoint(**_to_dict(cfg.checkpoint)) if checkpoint else None,
        )
        callbacks: list[L.Callback] = [ProgressBar(refresh_rate=10), *run, *([clock] if clock else [])]
        kwargs = {
            "accelerator": "auto",
            "devices": 1,
            "log_every_n_steps": 10,
            "enable_model_summary": False,
            **cfg.trainer,
        }
        kwargs["plugins"] = run_plugins(kwargs.get("plugins"))
        try:
            return L.Trainer(
                max_epochs=max_epochs,
                max_time=timedelta(seconds=max_time) if max_time else None,
                logger=loggers,
                callbacks=callbacks,
                enable_checkpointing=checkpoint,
                default_root_dir=str(folder),
                **kwargs,
            )
        except (TypeError, ValueError, MisconfigurationException) as e:
            raise SelfsupError(f"bad trainer setting in the pipeline config: {' '.join(str(e).split())}") from None

    def build(
        self, name: str, stage: Namespace, num_classes: int | None, extra: dict[str, Any] | None = None
    ) -> tuple[LightningModule, dict]:
        """A stage's module (seeded, so each stage starts from the same initialization stream)."""
        L.seed_everything(self.cfg.seed, verbose=False)
        return stage_model(name, stage, merge(self.shared, extra or {}), self.config_dirs, num_classes)

    def run_stage(
        self,
        name: str,
        stage: Namespace,
        model: LightningModule,
        warmup: dict,
        dm: ImageDataModule,
        checkpoint: bool = False,
    ) -> dict[str, float]:
        """Train one stage on ``dm`` and validate it; its figures, e.g. ``val/top1``.

        Re-run with the same ``--out``, a stage that finished returns its kept figures
        (``OUT/<stage>/result.json``) and an interrupted pretraining stage continues from its
        newest checkpoint; ``--fresh true`` runs everything again."""
        folder = self.out / name
        setup = json.dumps(
            {
                "model": type(model).__name__,
                "hparams": dict(model.hparams),
                "warmup": warmup,
                "max_epochs": stage.max_epochs,
                "max_time": stage.max_time,
            },
            sort_keys=True,
            default=str,
        )
        done, recorded = folder / "result.json", folder / "stage.json"
        ckpt = None
        if not self.cfg.fresh and recorded.is_file():
            same_run_or_stop(
                folder,
                json.loads(recorded.read_text()),
                json.loads(setup),
                f"stage {name} cannot continue it: give the pipeline its own --out, or --fresh true "
                "to run every stage again",
            )
            if done.is_file():
                say(f"pipeline: {name} finished earlier; its figures are kept ({done})")
                kept = json.loads(done.read_text())
                self.earlier_seconds += kept.pop("seconds", 0.0)
                return kept
            ckpt = newest_checkpoint(folder) if checkpoint else None
            if ckpt is not None:
                say(f"pipeline: {name} was interrupted; continuing from {ckpt}")
        writes = first_process()  # under DDP the stage's records are rank zero's to write
        if writes:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(recorded, setup)
            done.unlink(missing_ok=True)
            (folder / CORRECT).unlink(missing_ok=True)
        clock = StageClock()
        trainer = self.trainer(name, warmup, stage.max_epochs, stage.max_time, checkpoint=checkpoint, clock=clock)
        if stage.max_epochs > 0:  # 0: an evaluation that trains nothing (kNN)
            trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
        metrics = {k: float(v) for k, v in trainer.validate(model, datamodule=dm, verbose=False)[0].items()}
        if isinstance(model, RecordsCorrect):  # image by image, for the verdict's paired test
            correct = model.per_image_correct()  # (a collective call under DDP)
            self.correct_of[name] = correct
            if writes:
                write_atomic(folder / CORRECT, partial(torch.save, correct))
        finish_wandb(trainer)  # the next stage gets a run of its own
        self.earlier_seconds += clock.before  # (0 unless the stage continued from a checkpoint)
        if writes:
            write_atomic(done, json.dumps({**metrics, "seconds": clock.seconds()}, indent=2) + "\n")
        return metrics

    def evaluate(
        self,
        targets: list[tuple[str, ImageDataModule]],
        entry: str,
        checkpoint: Path | None,
        input_norm: str,
        depths: list[int],
        backbone: BackboneSpec,
    ) -> dict[str, float | None]:
        """Every evaluation stage on one backbone (``backbone``'s architecture with the weights of
        ``checkpoint``; None: untrained, its starting weights or random initialization) at each depth,
        on each labeled dataset of ``targets`` (``(suffix, data)``; :meth:`targets`):
        ``{evaluation}_top1``, ``{evaluation}_top5`` (None with 5 classes or fewer),
        ``{evaluation}_top1_stage{k}`` for the earlier depths, with ``_{suffix}`` after the
        evaluation's name for the other datasets (``linear_indomain_top1``)."""
        results: dict[str, float | None] = {}
        for suffix, labeled in targets:
            for ev_name, ev in self.cfg.evaluations.items():
                if not ev.enabled:
                    continue
                data = self.evaluation_data(labeled, ev_name, ev, suffix)
                key = f"{ev_name}_{suffix}" if suffix else ev_name
                takes_depth = True
                for depth in [-1, *depths]:
                    if depth != -1 and not takes_depth:  # fine-tuning trains the whole backbone: no depths
                        continue
                    features = {
                        "checkpoint": str(checkpoint) if checkpoint else None,
                        "input_norm": input_norm,
                        "depth": depth,
                    }
                    model, warmup = self.build(
                        ev_name,
                        with_model(ev, {"backbone": backbone.as_dict()}),
                        data.num_classes,
                        {"features": features},
                    )
                    takes_depth = not isinstance(model, FineTune)
                    # Every evaluation stage holds a selfsup backbone; nn.Module types it as Tensor | Module.
                    index = depth % cast(AnyBackbone, model.backbone).num_depths
                    run = f"{entry}_probe" if ev_name == "linear" else f"{entry}_{ev_name}"
                    run += ("" if depth == -1 else f"_stage{index}") + (f"_{suffix}" if suffix else "")
                    metrics = self.run_stage(run, ev, model, warmup, data)
                    # This run's per-image results (every rank has them), or a finished run's, kept on disk.
                    correct = self.correct_of.get(run)
                    if correct is None and (self.out / run / CORRECT).is_file():
                        correct = torch.load(self.out / run / CORRECT)
                    if depth == -1 and not suffix and correct is not None:
                        self.correct.setdefault(ev_name, {})[entry] = correct
                    if depth == -1:  # every accuracy it logs: top1, top5 (None with 5 classes or fewer), top1_k20, ...
                        results[f"{key}_top5"] = None
                        results.update({f"{key}_{k[4:]}": v for k, v in metrics.items() if k.startswith("val/top")})
                        if "search/lr" in metrics:  # the probe's rate, chosen on held-out training images
                            results[f"{key}_lr"] = float(f"{metrics['search/lr']:.6g}")  # logged as float32
                    else:
                        results[f"{key}_top1_stage{index}"] = metrics["val/top1"]
        return results

    def targets(self, dm: ImageDataModule) -> list[tuple[str, ImageDataModule]]:
        """The labeled data the evaluations run on, as ``(suffix, data)``: the evaluation data
        (``""``), and ``("indomain", dm)`` when those are a separate ``eval_root`` and the
        pretraining images have labels of their own (``--in_domain``)."""
        labeled = dm.evaluation_data
        assert labeled is not None  # run() stops first when there are none
        out = [("", labeled)]
        if self.cfg.data.eval_root and dm.has_labels and self.cfg.in_domain:
            out.append(("indomain", dm))
        return out

    def evaluation_data(self, labeled: ImageDataModule, name: str, ev: Namespace, suffix: str = "") -> ImageDataModule:
        """The labeled data an evaluation trains and measures on: ``labeled``, or (with the
        stage's ``data``) a share of its labels, made once so every backbone gets the same images."""
        if not ev.data:
            return labeled
        if (name, suffix) not in self._evaluation_data:
            unknown = set(ev.data) - {"label_fraction", "batch_size"}
            if unknown:
                raise SelfsupError(
                    f"evaluations.{name}.data takes label_fraction and batch_size, not {', '.join(sorted(unknown))}"
                )
            dm = labeled.derived(**ev.data)
            train = dm.splits()[0]
            if dm.hp.drop_last and len(train) < dm.hp.batch_size:
                raise SelfsupError(
                    f"evaluations.{name} trains on {len(train)} images, fewer than a batch of "
                    f"{dm.hp.batch_size}: set evaluations.{name}.data.batch_size"
                )
            self._evaluation_data[name, suffix] = dm
        return self._evaluation_data[name, suffix]

    def starts(self, stages: list[str]) -> dict[str, dict[str, Any]]:
        """Where each enabled pretraining stage's backbone starts, as ``model`` overrides
        (``{"backbone": {"weights": ...}}``, and ``{"teacher": {"weights": ...}}`` where a
        distillation's teacher names ``start`` or a stage): a weights file, an earlier stage's
        checkpoint, or None (random initialization). Checked before anything trains: a stage
        starts only from (or learns only from) one listed before it, so there are no cycles."""
        out: dict[str, dict[str, Any]] = {}
        for name in stages:
            if name in (RANDOM, START, BEST):
                raise SelfsupError(
                    f"a stage cannot be called {name!r}, a name of the summary's own: rename stages.{name}"
                )
            stage = self.cfg.stages[name]
            backbone, teacher = (stage.model.get(k) or {} for k in ("backbone", "teacher"))
            ref = stage.start_from or self._named(backbone.get("weights"))
            if ref is None:
                out[name] = {"backbone": {"weights": backbone.get("weights") or self.cfg.backbone.weights}}
            else:
                out[name] = {"backbone": {"weights": self._resolve(name, ref, "starts from", stages)}}
            if ref not in (None, RANDOM, START):
                self.parents[name] = ref
            learns = self._named(teacher.get("weights"))
            if learns is not None:
                out[name]["teacher"] = {"weights": self._resolve(name, learns, "learns from", stages)}
                if learns not in (RANDOM, START):
                    self.teachers[name] = learns
        return out

    def _named(self, weights: str | None) -> str | None:
        """``weights`` where it names a stage, ``start`` or ``random`` rather than a file."""
        return weights if weights in self.cfg.stages or weights in (RANDOM, START) else None

    def _resolve(self, name: str, ref: str, what: str, stages: list[str]) -> str | None:
        """The weights file ``ref`` (a stage, ``start``, ``random``) stands for in stage ``name``;
        a one-line error unless it is listed before ``name``."""
        i = stages.index(name)
        earlier = ", ".join([*stages[:i], START, RANDOM])
        if ref == RANDOM:
            return None
        if ref == START:
            if not self.cfg.backbone.weights:
                raise SelfsupError(f"stages.{name} {what} the start, but there is no backbone.weights to start from")
            return str(self.cfg.backbone.weights)
        if ref == name:
            raise SelfsupError(f"stages.{name} {what} itself: name an earlier stage ({earlier})")
        if ref not in stages:
            why = "is switched off (enabled: false)" if ref in self.cfg.stages else "is no stage of this pipeline"
            raise SelfsupError(f"stages.{name} {what} {ref}, which {why}; choose from {earlier}")
        if stages.index(ref) > i:
            raise SelfsupError(
                f"stages.{name} {what} {ref}, which runs after it (stages run in the order listed): "
                f"list {ref} before {name}"
            )
        return str(self.out / ref / "checkpoints" / "last.ckpt")

    def checked_start(self, name: str, start: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """A stage's start as the checks before training build it: an earlier stage's backbone
        does not exist yet (its architecture is compared instead), so it is left out."""
        earlier = [s for s in (self.parents.get(name), self.teachers.get(name)) if s is not None]
        made = {str(self.out / s / "checkpoints" / "last.ckpt") for s in earlier}
        return {k: {"weights": None if v["weights"] in made else v["weights"]} for k, v in start.items()}

    def rankme(self, images: torch.Tensor, spec: BackboneSpec, checkpoint: Path | None, input_norm: str) -> float:
        """RankMe (the embeddings' effective rank; Garrido et al. 2023) of one backbone on fixed images."""
        L.seed_everything(self.cfg.seed, verbose=False)
        backbone = spec.random().build() if checkpoint else spec.build()
        if checkpoint:
            load_backbone(backbone, checkpoint)
        features = Features(input_norm=cast(InputNorm, input_norm))
        # On the stages' GPU where they have one: a ResNet-50 over 1,024 images is slow on a CPU.
        accelerator = str(self.cfg.trainer.get("accelerator", "auto"))
        gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        device = torch.device("cuda" if gpu else "cpu")
        backbone.to(device)
        z = embed_all(lambda x: frozen_features(backbone, x, features), images, device)
        return float(f"{rankme(z.cpu()):.4g}")

    def run(self) -> dict[str, Any]:
        t_start = time.time()
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        dm = ImageDataModule(**_to_dict(cfg.data))
        dm.run_dir = str(self.out)
        # Every check before the first stage: a stop leaves no half-run pipeline behind.
        dm.setup("fit")
        labeled = dm.evaluation_data
        evaluations = [name for name, ev in cfg.evaluations.items() if ev.enabled]
        if labeled is None and evaluations:
            say(
                f"pipeline: {cfg.data.root} has no labels (data.labels={cfg.data.labels}), so the evaluations "
                f"({', '.join(evaluations)}) are left out and backbones are ranked by RankMe alone; give labeled "
                "evaluation data with --data.eval_root DIR (DIR/<class>/<image>) for accuracies"
            )
        stages = [name for name, st in cfg.stages.items() if st.enabled]
        for section, entries in (("stages", cfg.stages), ("evaluations", cfg.evaluations)):
            for name, st in entries.items():
                check_ranges(
                    f"{section}.{name}",
                    {"max_epochs": (st.max_epochs, NON_NEGATIVE), "max_time": (st.max_time, POSITIVE)},
                )
        starts = self.starts(stages)
        start = cfg.backbone.weights
        spec = BackboneSpec.of(self.shared["backbone"])
        # Every stage's config parses and fits its data before anything trains (an earlier
        # stage's backbone does not exist yet: its architecture is checked against the stage's).
        targets = self.targets(dm) if labeled is not None else []
        checks = [
            (
                name,
                with_model(cfg.stages[name], self.checked_start(name, starts[name])),
                dm,
            )
            for name in stages
        ]
        checks += [
            (name, with_model(ev, {"backbone": {"weights": None}}), self.evaluation_data(data, name, ev, suffix))
            for suffix, data in targets
            for name, ev in cfg.evaluations.items()
            if ev.enabled
        ]
        # Each stage's backbone without its starting weights: what its evaluations build.
        architectures: dict[str, dict[str, Any]] = {}
        teachers: dict[str, dict[str, Any]] = {}
        for i, (name, stage, data) in enumerate(checks):
            with warnings.catch_warnings():  # a teacher still to be trained has no weights yet
                warnings.filterwarnings("ignore", "distillation: the teacher")
                model, _ = stage_model(name, stage, self.shared, self.config_dirs, data.num_classes)
            if isinstance(model, ChecksData):
                model.check_data(data)
            if i < len(stages):
                architectures[name] = {**BackboneSpec.of(model.hparams.get("backbone")).as_dict(), "weights": None}
                if name in self.teachers:
                    teachers[name] = {**BackboneSpec.of(model.hparams.get("teacher")).as_dict(), "weights": None}
        for name, parent in self.parents.items():
            if not same_architecture(architectures[parent], architectures[name]):
                raise SelfsupError(
                    f"stages.{name} starts from {parent}'s backbone, but builds another ({architectures[name]} "
                    f"against {architectures[parent]}): give both the same backbone"
                )
        for name, parent in self.teachers.items():
            if not same_architecture(architectures[parent], teachers[name]):
                raise SelfsupError(
                    f"stages.{name} learns from {parent}'s backbone, but its teacher is another ({teachers[name]} "
                    f"against {architectures[parent]}): give the teacher {parent}'s backbone"
                )
        rank_images = rankme_images(labeled if labeled is not None else dm)[1]
        results: dict[str, dict[str, Any]] = {}

        if cfg.baseline:
            t0 = self.seconds()
            results[cfg.baseline] = {
                **self.evaluate(targets, cfg.baseline, None, "channel", [], spec.random()),
                "rankme": self.rankme(rank_images, spec.random(), None, "channel"),
                "seconds": self.seconds() - t0,
            }
        if start:  # the weights the user has, evaluated as they are: the baseline that matters
            t0 = self.seconds()
            results[START] = {
                **self.evaluate(targets, START, None, "channel", [], spec),
                "rankme": self.rankme(rank_images, spec, None, "channel"),
                "seconds": self.seconds() - t0,
            }

        for name in stages:
            t0 = self.seconds()
            stage = with_model(cfg.stages[name], starts[name])
            model, warmup = self.build(name, stage, dm.num_classes)
            metrics = self.run_stage(name, stage, model, warmup, dm, checkpoint=True)
            extra = {"pretext_top1": metrics["val/pretext_top1"]} if "val/pretext_top1" in metrics else {}
            # Evaluate with the inputs the backbone was trained on (per-patch standardized for
            # relative location), and at earlier depths too: pretext tasks over-specialize the last one.
            norm = model.probe_input_norm if isinstance(model, ProbeInputNorm) else "channel"
            ckpt = self.out / name / "checkpoints" / "last.ckpt"
            # probe_stages, the name before 0.2, wins where given (an empty list switches probing off).
            depths = stage.probe_stages if stage.probe_stages is not None else stage.probe_depths
            own = BackboneSpec.of(architectures[name])
            evaluated = self.evaluate(targets, name, ckpt, norm, depths, own)
            results[name] = {
                **extra,
                **evaluated,
                "rankme": self.rankme(rank_images, own, ckpt, norm),
                "seconds": self.seconds() - t0,
            }
        if START in results:
            for key, r in results.items():
                if key != START:
                    r["delta_vs_start"] = deltas(r, results[START])

        # The verdict's sentences name random init and the start in its own words.
        display = {k: DISPLAY_NAMES.get(k, k) for k in results if k not in (cfg.baseline, START)}
        first = next((e for e in evaluations if e in self.correct), None)
        if labeled is not None and first is not None:
            judged = verdict(self.correct[first], first, START if start else None, cfg.baseline, display)
        else:
            judged = rank_by_rankme(
                {k: r["rankme"] for k, r in results.items()}, START if start else None, cfg.baseline, display
            )
        best_spec = BackboneSpec.of(architectures[judged.best]) if judged.best in stages else spec
        started_from = starts[judged.best]["backbone"]["weights"] if judged.best in stages else None
        best = self.export_best(judged.best, judged.as_dict(), best_spec, started_from, stages)

        def where(root: str | None) -> str:
            return str(Path(root).expanduser().resolve()) if root else "(embedded sample)"

        pretrain_train, pretrain_eval = dm.splits()
        labeled_sizes = [len(split) for split in labeled.splits()] if labeled is not None else [0, 0]
        summary = {
            "data_root": where(cfg.data.root),
            "eval_root": where(cfg.data.eval_root) if cfg.data.eval_root else where(cfg.data.root),
            "labels": "folders" if dm.has_labels else "none",
            "image_size": dm.image_size,
            "num_classes": labeled.num_classes if labeled is not None else None,
            "pretrain_images": len(pretrain_train),
            "train_images": labeled_sizes[0],
            "eval_images": labeled_sizes[1],
            # Training images of each evaluation (fewer where it trains on a share of the labels).
            "evaluation_train_images": {
                name: len(self.evaluation_data(labeled, name, cfg.evaluations[name]).splits()[0])
                for name in evaluations
                if labeled is not None
            },
            # With in-domain figures: the pretraining data's own split they come from.
            "in_domain": (
                {"train_images": len(pretrain_train), "eval_images": len(pretrain_eval), "num_classes": dm.num_classes}
                if len(targets) > 1
                else None
            ),
            "images": {**dm.image_counts, "skipped_list": BAD_FILES_NAME if dm.image_counts["skipped"] else None},
            "backbone": cfg.backbone.name,
            "start": start,
            "starts": {name: self.parents.get(name, starts[name]["backbone"]["weights"]) for name in stages},
            "rankme_images": len(rank_images),
            "results": results,
            "verdict": {**judged.as_dict(), "exported": best},
            "wall_seconds": (wall := time.time() - t_start),
            # with what the stages kept or continued from earlier runs of this --out took there
            "seconds_in_all": wall + self.earlier_seconds,
        }
        table = summary_markdown(
            summary, labeled.eval_split if labeled is not None else "", evaluations if labeled is not None else []
        )
        if first_process():  # one summary for the job, whatever its number of processes
            write_atomic(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            write_atomic(self.out / "summary.md", table)
            print("\n" + table, flush=True)
        return summary

    def export_best(
        self, best: str, judged: dict[str, Any], spec: BackboneSpec, started_from: str | None, stages: list[str]
    ) -> str:
        """The verdict's backbone, exported to ``OUT/best/`` with its JSON card; its path."""
        fmt = self.cfg.export or natural_format(spec)
        if best in stages:
            backbone = spec.random().build()
            load_backbone(backbone, self.out / best / "checkpoints" / "last.ckpt")
            what = {"source": str(self.out / best / "checkpoints" / "last.ckpt"), "started_from": started_from}
        else:  # the start as it is, or random initialization
            L.seed_everything(self.cfg.seed, verbose=False)
            backbone = (spec if best == START else spec.random()).build()
            what = {"source": spec.weights if best == START else "random initialization"}
        out = self.out / BEST / "backbone.pt"
        if first_process():
            write_export(spec, backbone, out, fmt, {"entry": best, **what, "verdict": judged, "pipeline": self.config})
        say(f"pipeline: the best backbone ({DISPLAY_NAMES.get(best, best)}) is {out} ({fmt}); what it is: {out}.json")
        return str(out)


def same_architecture(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two backbone specs build the same tensors (``cifar_stem`` means nothing to the small CNN)."""
    if a == b:
        return True
    shapes = [{k: v.shape for k, v in BackboneSpec.of(x).random().build().state_dict().items()} for x in (a, b)]
    return shapes[0] == shapes[1]


def with_model(stage: Namespace, override: dict[str, Any]) -> Namespace:
    """A copy of a stage whose ``model`` overrides have ``override`` on top."""
    copy = stage.clone()
    copy.model = merge(dict(stage.model or {}), override)
    return copy


def deltas(entry: dict[str, Any], start: dict[str, Any]) -> dict[str, float]:
    """Each accuracy (and RankMe) of ``entry`` minus the start's: positive where it is better."""
    return {
        k: float(f"{v - start[k]:.6g}")
        for k, v in entry.items()
        if ("_top" in k or k == "rankme") and isinstance(v, int | float) and isinstance(start.get(k), int | float)
    }


def summary_markdown(s: dict[str, Any], eval_split: str = "", evaluations: Sequence[str] = ("linear",)) -> str:
    """The summary as a Markdown table, one row per backbone and two columns per evaluation;
    accuracies in percent."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def cell(r: dict[str, Any], key: str) -> str:
        """A figure, with its difference to the start in points where there is one."""
        delta = (r.get("delta_vs_start") or {}).get(key)
        return pct(r.get(key)) + ("" if delta is None else f" ({100 * delta:+.1f})")

    names = DISPLAY_NAMES
    separate = s.get("eval_root", s["data_root"]) != s["data_root"]
    counts = s.get("images", {})
    in_domain = s.get("in_domain")
    # The prefixes of each evaluation's figures: linear_..., and linear_indomain_... beside them.
    keyed = [*evaluations, *([f"{e}_indomain" for e in evaluations] if in_domain else [])]
    if in_domain:  # in-domain beside transfer: one more column per evaluation
        columns = [
            c
            for e in evaluations
            for c in (
                (f"{e}_indomain_top1", f"{e} top-1 in-domain"),
                (f"{e}_top1", f"{e} top-1 transfer"),
                (f"{e}_top5", f"{e} top-5 transfer"),
            )
        ]
    else:
        columns = [(f"{e}_{k}", f"{e} {k[:3]}-{k[3:]}") for e in evaluations for k in ("top1", "top5")]
    lines = [
        f"# selfsup pipeline: {s['data_root']}",
        "",
        *(
            [
                f"Pretrained on {s['pretrain_images']} images of {s['data_root']} "
                f"({'labeled' if s['labels'] == 'folders' else 'unlabeled'}); "
                f"evaluated on {s['eval_root']}.",
                "",
            ]
            if separate
            else []
        ),
        *(
            [
                f"In-domain: trained and measured on the pretraining images' own labels ({in_domain['train_images']} "
                f"train / {in_domain['eval_images']} held-apart images, {in_domain['num_classes']} classes); transfer: "
                "on the evaluation data below.",
                "",
            ]
            if in_domain
            else []
        ),
        (
            f"{s['train_images']} train / {s['eval_images']} eval images{f' ({eval_split})' if eval_split else ''}, "
            f"{s['image_size']} px, {s['num_classes']} classes, backbone {s['backbone']}; "
            f"accuracies on the eval split"
            if s.get("num_classes")
            else f"No labeled evaluation data: {s['image_size']} px, backbone {s['backbone']}; backbones compared "
            "by RankMe alone"
        )
        + (f", in brackets the difference to the start ({s['start']}) in points" if s.get("start") else "")
        + f"; RankMe on {s.get('rankme_images', 0)} fixed images; "
        + (
            f"{s['wall_seconds']:.0f} s in all."
            if s.get("seconds_in_all", s["wall_seconds"]) == s["wall_seconds"]
            else f"{s['seconds_in_all']:.0f} s in all, {s['wall_seconds']:.0f} s of them in the run that finished."
        )
        + (
            f" {counts['skipped']} unreadable files skipped ({counts['skipped_list']})."
            if counts.get("skipped")
            else ""
        ),
        "",
        "| backbone from | pretext top-1 | " + " | ".join(title for _, title in columns) + " | RankMe | seconds |",
        "|---|---:|" + "---:|" * len(columns) + "---:|---:|",
    ]
    notes = []
    for key, r in s["results"].items():
        cells = "".join(f"{cell(r, k)} | " for k, _ in columns)
        rank = "-" if r.get("rankme") is None else f"{r['rankme']:.1f}"
        lines.append(f"| {names.get(key, key)} | {pct(r.get('pretext_top1'))} | {cells}{rank} | {r['seconds']:.0f} |")
        for e in keyed:
            by_stage = [
                f"depth {k.removeprefix(f'{e}_top1_stage')} {pct(v)}"
                for k, v in r.items()
                if k.startswith(f"{e}_top1_stage")
            ]
            if by_stage:
                what = e.replace("_indomain", " in-domain")
                notes.append(
                    f"{names.get(key, key)}, {what} top-1 from earlier backbone depths: {', '.join(by_stage)}."
                )
    for e in keyed:
        rates = [f"{names.get(key, key)} {r[f'{e}_lr']:g}" for key, r in s["results"].items() if r.get(f"{e}_lr")]
        if rates:
            what = e.replace("_indomain", " in-domain")
            notes.append(f"{what}: rate chosen on held-out training images (never the eval split): {', '.join(rates)}.")
    for stage, start in (s.get("starts") or {}).items():
        if start:
            notes.append(f"{names.get(stage, stage)} started from {names.get(start, start)}.")
    judged = s.get("verdict")
    verdict_lines = ["", f"**Verdict.** {judged['text']} Exported: {judged['exported']}."] if judged else []
    return "\n".join(lines + ([""] + notes if notes else []) + verdict_lines) + "\n"


def pipeline_main(argv: Sequence[str]) -> dict[str, Any]:
    cfg = build_parser().parse_args(list(argv))
    # One pipeline per --out, held by rank zero for the whole job (see selfsup.files).
    held = getattr(rank_zero_only, "rank", 0) == 0
    if held:
        hold_folder(cfg.out, "selfsup pipeline")
    try:
        return Pipeline(cfg).run()
    finally:
        if held:
            release_folder(cfg.out)
