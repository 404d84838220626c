"""``selfsup patches``: draw the sampled patch grids of a few images to a PNG, to check the
relative-location sampling by eye.

    selfsup patches [--data.root DIR] [--data.image_size 64] [--model.grid kolesnikov] \\
        [--model.color drop] [--count 6] [--out patches.png]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser
from torchvision.io import write_png

from selfsup.config import ConfigErrorMixin
from selfsup.data.datamodule import ImageDataModule
from selfsup.media import draw_patches, spread
from selfsup.methods import RelativeLocation


class PatchesParser(ConfigErrorMixin, ArgumentParser):
    """Errors become one-line SelfsupErrors."""


def build_parser() -> ArgumentParser:
    p = PatchesParser(prog="selfsup patches", description=__doc__.splitlines()[0], default_meta=False)
    p.add_argument("--config", action=ActionConfigFile, help="a relative_location config (its model and data)")
    p.add_class_arguments(ImageDataModule, "data")
    p.add_class_arguments(RelativeLocation, "model")
    p.add_argument("--count", type=int, default=6, help="images to draw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default="patches.png")
    return p


def patches_main(argv: Sequence[str]) -> Path:
    cfg = build_parser().parse_args(list(argv))
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
