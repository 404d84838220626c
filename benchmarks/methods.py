"""Each method's step against a SimCLR step: the same network, batch and images, side by side.

What a method's step costs beyond SimCLR's is its extra compute: BYOL's predictor and its target
network's forward pass (no backward), VICReg's wider expander and its covariance matrices, DINO's
local crops and teacher, MAE's encoder on a quarter of the patches and its decoder. This
benchmark measures, in one process and in interleaved rounds (each figure is the median over the rounds;
ratios are taken within a round):

- ``step``: images/s of whole training steps through a Lightning Trainer (the data, the views on
  the device, forward, backward, the optimizer, the target's update), and each method's ratio
  to SimCLR's;
- ``compute``: seconds of the bare step on ready-made views (forward, backward, optimizer), and
  the FLOPs of that step (``torch.utils.flop_counter``: matrix products and convolutions);
- ``predicted``: the whole-step ratio the extra compute predicts, ``T / (T + c - c_simclr)`` with
  T SimCLR's whole step and c each method's bare step per image; ``measured / predicted`` near 1
  means the method costs what its compute does, no more.

    python -m benchmarks methods [--backbone resnet18 --cifar-stem] [--json FILE] [--markdown FILE]
    python -m benchmarks methods --methods simclr,dino,mae --backbone timm:vit_tiny_patch16_224 \
        --image-size 32 --patch-size 4 --timm-kwargs '{"depth": 6, "embed_dim": 96, "num_heads": 3}'
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.against_lightly import StepTimer, trainer_for
from benchmarks.common import parser, seconds_per_call, write_json
from selfsup.data import ImageDataModule
from selfsup.data.views import normalize, to_float
from selfsup.evaluation import OnlineSpec
from selfsup.methods import BYOL, DINO, MAE, SimCLR, VICReg
from selfsup.models.backbones import BackboneSpec
from selfsup.models.momentum import momentum_update
from selfsup.runtime import keep_freed_memory

METHODS = ("simclr", "byol", "vicreg", "dino", "mae")


def build(name: str, backbone: BackboneSpec, hidden: int) -> L.LightningModule:
    """Each method with its own heads (SimCLR's and BYOL's ``hidden`` wide, VICReg's expander at
    its default, 4 x the features; DINO's head and MAE's decoder as ``configs/pipeline/vit.yaml``
    sets them, DINO with its 2 global and 6 local crops), Adam, no online evaluator."""
    common: dict[str, Any] = {
        "backbone": backbone,
        "optimizer": {"name": "adam", "lr": 1e-3},
        "online": OnlineSpec(enabled=False),
    }
    if name == "simclr":
        return SimCLR(proj_hidden=hidden, proj_dim=128, **common)
    if name == "byol":
        return BYOL(proj_hidden=hidden, proj_dim=256, pred_hidden=hidden, **common)
    if name == "dino":
        return DINO(out_dim=4096, hidden_dim=hidden, **common)
    if name == "mae":
        return MAE(decoder_dim=128, decoder_depth=2, decoder_heads=4, **common)
    return VICReg(**common)


def ready_loss(model: L.LightningModule, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The method's loss on inputs made once from uint8 ``images``: two views (the images
    themselves, normalised), DINO's multi-crop views, MAE's normalised images (a new mask each call)."""
    if isinstance(model, DINO):
        crops = model.views(images, torch.Generator().manual_seed(0))
        return lambda: model.loss(crops)[0]
    x = normalize(to_float(images))
    if isinstance(model, MAE):
        return lambda: model.loss(x)[0]
    return lambda: cast(Any, model).loss(x, x.clone())[0]


def bare_step(model: L.LightningModule, loss: Callable[[], torch.Tensor]) -> Any:
    """One step on ready-made inputs: the target's update (BYOL, DINO), the loss, backward, the optimizer."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        if isinstance(model, BYOL):
            momentum_update([model.backbone, model.projector], [model.target_backbone, model.target_projector], 0.99)
        if isinstance(model, DINO):
            momentum_update([model.backbone, model.head], [model.teacher_backbone, model.teacher_head], 0.99)
        value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    return step


def flops(model: L.LightningModule, loss: Callable[[], torch.Tensor]) -> float:
    """FLOPs of one forward and backward pass of the method's loss."""
    with FlopCounterMode(display=False) as counter:
        loss().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def main(argv: list[str]) -> dict[str, Any]:
    ap = parser(__name__, __doc__)
    ap.add_argument("--methods", default="simclr,byol,vicreg", help="comma-separated, simclr first")
    ap.add_argument("--backbone", default="small_cnn")
    ap.add_argument("--width", type=int, default=32, help="of the small CNN")
    ap.add_argument("--cifar-stem", action="store_true")
    ap.add_argument("--image-size", type=int, default=None, help="of a timm ViT (backbone.image_size)")
    ap.add_argument("--patch-size", type=int, default=None, help="of a timm ViT (backbone.patch_size)")
    ap.add_argument("--timm-kwargs", type=json.loads, default=None, help="JSON, as backbone.timm_kwargs")
    ap.add_argument("--hidden", type=int, default=512, help="of SimCLR's projector and BYOL's projector and predictor")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="training steps of each whole-step run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=2048, help="of the embedded sample")
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--json", default="runs/bench/methods.json")
    ap.add_argument("--markdown", default="runs/bench/methods.md")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    if methods[0] != "simclr" or not set(methods) <= set(METHODS):
        ap.error(f"--methods: simclr first, then any of {', '.join(METHODS[1:])}")
    keep_freed_memory()  # as the selfsup command does: no pages returned and faulted back each step
    backbone = BackboneSpec(
        args.backbone,
        width=args.width,
        cifar_stem=args.cifar_stem,
        image_size=args.image_size,
        patch_size=args.patch_size,
        timm_kwargs=args.timm_kwargs,
    )
    dm = ImageDataModule(root=None, batch_size=args.batch_size, max_train_images=args.images, max_eval_images=64)
    dm.setup("fit")
    images = next(iter(dm.train_dataloader()))["image"]
    rates: dict[str, list[float]] = {m: [] for m in methods}
    compute: dict[str, list[float]] = {m: [] for m in methods}
    counted: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        for r in range(args.rounds):
            for name in methods:
                L.seed_everything(r, verbose=False)
                model = build(name, backbone, args.hidden)
                timer = StepTimer(skip=3)
                trainer_for(args.steps, timer, folder, args.precision).fit(model, datamodule=dm)
                rates[name].append(timer.rate)
                model = build(name, backbone, args.hidden).train()
                loss = ready_loss(model, images)
                compute[name].append(seconds_per_call(bare_step(model, loss), repeats=3, rounds=3, warmup=1))
                counted.setdefault(name, flops(model, loss))
                print(f"round {r + 1} {name}: {rates[name][-1]:.1f} images/s", flush=True)
    rows = []
    for name in methods:
        rounds = []
        for k in range(args.rounds):
            whole = args.batch_size / rates["simclr"][k]  # SimCLR's whole step in this round, seconds
            predicted = whole / (whole + (compute[name][k] - compute["simclr"][k]))
            ratio = rates[name][k] / rates["simclr"][k]
            rounds.append({"images_per_s": rates[name][k], "compute_s": compute[name][k], "ratio": ratio})
            rounds[-1] |= {"predicted": predicted, "measured_over_predicted": ratio / predicted}
        # Each figure the median over the rounds: this machine drifts by 10-30% over minutes.
        median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        rows.append(
            {
                "method": name,
                "images_per_s": median["images_per_s"],
                "ratio_to_simclr": median["ratio"],
                "compute_s": median["compute_s"],
                "compute_ratio": median["compute_s"] / statistics.median(compute["simclr"]),
                "flops_per_image": counted[name] / args.batch_size,
                "flops_ratio": counted[name] / counted["simclr"],
                "predicted_ratio": median["predicted"],
                "measured_over_predicted": median["measured_over_predicted"],
                "rounds": rounds,
            }
        )
    result = write_json(args.json, {"args": vars(args), "rows": rows})
    text = markdown(result)
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The rows as a table under a line naming the machine, the commit and the network."""
    m, a = result["machine"], result["args"]
    commit = result["commit"]["hash"] + (" with uncommitted changes" if result["commit"]["dirty"] else "")
    head = (
        f"{m['cpu']} ({m['cores']} cores, torch {m['torch']}, GPU {m['gpu']}); commit {commit}; "
        f"{a['backbone']}"
        + (f" at {a['image_size']} px, patch {a['patch_size']}, {a['timm_kwargs']}" if a.get("image_size") else "")
        + f" batch {a['batch_size']} at {a['precision']}"
    )
    lines = [
        head,
        "",
        "| method | images/s | vs SimCLR | bare step | FLOPs/image | FLOPs vs SimCLR | predicted vs SimCLR "
        "| measured / predicted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['images_per_s']:.0f} | {r['ratio_to_simclr']:.2f} | {r['compute_s'] * 1e3:.0f} ms "
            f"| {r['flops_per_image'] / 1e6:.0f} M | {r['flops_ratio']:.2f} | {r['predicted_ratio']:.2f} "
            f"| {r['measured_over_predicted']:.2f} |"
        )
    return "\n".join(lines)
