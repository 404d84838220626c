"""``selfsup patches``: draw the sampled patch grids of a few images to a PNG, to check the
relative-location sampling by eye.

    selfsup patches [--data.root DIR] [--data.image_size 64] [--model.grid kolesnikov] \\
        [--model.color drop] [--count 6] [--out patches.png]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser
from torchvision.io import write_png

from selfsup import SelfsupError
from selfsup.config import ConfigErrorMixin
from selfsup.data.datamodule import ImageDataModule
from selfsup.media import draw_patches, spread
from selfsup.methods import RelativeLocation


class PatchesParser(ConfigErrorMixin, ArgumentParser):
    """Errors become one-line SelfsupErrors."""


def build_parser(config: str | None = None) -> ArgumentParser:
    """The parser, with the ``model`` (init_args) and ``data`` sections of the ``selfsup fit``
    config ``config`` as its defaults, so that the command line still overrides them."""
    p = PatchesParser(prog="selfsup patches", description=__doc__.splitlines()[0], default_meta=False)
    p.add_argument(
        "--config",
        type=str | None,
        default=None,
        help="a relative location fit config, e.g. configs/relative_location/cifar10.yaml (its model and data)",
    )
    p.add_class_arguments(ImageDataModule, "data")
    p.add_class_arguments(RelativeLocation, "model")
    p.add_argument("--count", type=int, default=6, help="images to draw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default="patches.png")
    if config is not None:
        path = Path(config).expanduser()
        if not path.is_file():
            raise SelfsupError(f"config not found: {path}")
        fit = yaml.safe_load(path.read_text()) or {}
        model = fit.get("model") or {}
        init = model.get("init_args", model) if isinstance(model, dict) else {}
        p.set_defaults(
            {f"model.{k}": v for k, v in init.items()} | {f"data.{k}": v for k, v in (fit.get("data") or {}).items()}
        )
    return p


def patches_main(argv: Sequence[str]) -> Path:
    args = list(argv)
    config = None  # read first: its sections become the defaults the command line overrides
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            config = args[i + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
    cfg = build_parser(config).parse_args(args)
    model_args = cfg.model.as_dict()
    model_args.pop("__path__", None)
    model = RelativeLocation(**model_args)
    dm_args = cfg.data.as_dict()
    dm_args.pop("__path__", None)
    dm = ImageDataModule(**dm_args)
    dm.setup()
    train = dm.splits()[0]
    figure = draw_patches(model, train.images[spread(len(train), cfg.count)], cfg.seed)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(figure, str(out))
    spec = model.grid_spec(dm.image_size)
    print(
        f"wrote {out}: {cfg.count} images, {dm.image_size} px, patch {spec.patch}, gap {spec.gap}"
        f"{f'..{spec.gap_max}' if spec.gap_max is not None else ''}, jitter {spec.jitter}"
    )
    return out
