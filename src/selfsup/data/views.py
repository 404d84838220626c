"""Batched image augmentation on the training device (SimCLR recipe, Chen et al. 2020, App. A).

All random parameters are drawn per image in one call each, and every operation acts on the
whole batch at once, so augmentation keeps pace with the model instead of starving it in
per-sample DataLoader workers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.config import AREA, PROBABILITY, PlainData, Range, check_ranges
from selfsup.data.crops import crop_boxes, crop_grid, uniform

#: ImageNet channel statistics, the usual choice for natural images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: torchvision's ``rgb_to_grayscale`` weights (ITU-R 601-2 luma), so that contrast and
#: saturation match its ColorJitter exactly.
_LUMA = (0.2989, 0.587, 0.114)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float (B, 3, H, W) in [0, 1]; floats pass through."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def standardization(
    like: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - mean) / std as ``x * scale + shift``: scale 1 / std and shift -mean / std, each
    (1, C, 1, 1) on ``like``'s device and dtype."""
    scale = 1 / like.new_tensor(std).view(1, -1, 1, 1)
    return scale, -like.new_tensor(mean).view(1, -1, 1, 1) * scale


def normalize(
    x: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """Per-channel standardization of (B, 3, H, W) floats in [0, 1]."""
    scale, shift = standardization(x, mean, std)
    # A multiply and an in-place add: three times faster on the CPU than addcmul with its two
    # broadcast operands.
    return (x * scale).add_(shift)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma, summed as torchvision sums it."""
    # Three planes added, not a sum over the channel dimension: a strided reduction is several
    # times slower on the CPU.
    r, g, b = x.unbind(1)
    return (r * _LUMA[0]).add_(g * _LUMA[1]).add_(b * _LUMA[2]).unsqueeze(1)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random box of each image (drawn as torchvision's RandomResizedCrop draws it, see
    :func:`crop_boxes`), resize it to ``size`` x ``size`` bilinearly and flip it horizontally
    with ``flip_p``. One affine ``grid_sample`` does crop, resize and flip together.

    Shapes: (B, C, H, W) float -> (B, C, size, size).
    """
    b, _, h, w = x.shape
    boxes = crop_boxes(b, h, w, scale, ratio, generator, x.device)
    flip = uniform(b, generator, x.device) < flip_p
    # Every sample point lies inside its box, so inside the image: "border" gives what
    # "reflection" gives there (tests/unit/test_views.py checks it), about 10% faster.
    return F.grid_sample(
        x, crop_grid(boxes, flip, h, w, size).to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's brightness: ``clamp(f * x)``. x: (B, 3, H, W) in [0, 1]; f: (B,)."""
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's contrast: blend with the image's mean luma by ``f`` (B,)."""
    # The mean of the luma is the luma of the channel means: one pass over the image, not three.
    m = x.mean(dim=(2, 3))
    mean = (m[:, 0] * _LUMA[0] + m[:, 1] * _LUMA[1] + m[:, 2] * _LUMA[2]).view(-1, 1, 1, 1)
    return torch.lerp(mean.expand_as(x), x, f.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's saturation: blend with the per-pixel luma by ``f`` (B,)."""
    return torch.lerp(grayscale(x).expand_as(x), x, f.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's hue: shift the HSV hue by ``f`` (B,) of a full turn, f in [-0.5, 0.5].

    Computed without the HSV round trip: the value (max) and the chroma (max - min) stay, so each
    channel is ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with k = (n + 6 h') mod 6, n = 5, 3,
    1 for R, G, B and h' the shifted hue (the closed form of HSV to RGB, c = v - v s clamp(min(k,
    4 - k), 0, 1), as v s is the chroma); a gray pixel (chroma 0) stays as it is, as in
    torchvision. Branch-free: the largest channel is picked by 0/1 float masks and the turn wrapped
    with ``floor``, as ``where`` and ``remainder`` are several times slower than arithmetic on the CPU."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    # 1.0 where the channel is the largest (maxc - c >= 0, so its sign is 0 or 1), the first of
    # equals as in torchvision: R, then G, then B.
    is_r = torch.sign(maxc - r).neg_().add_(1.0)
    is_g = torch.sign(maxc - g).neg_().add_(1.0).mul_(1.0 - is_r)
    is_b = (1.0 - is_r).sub_(is_g)
    # Hue in sixths of a turn: R: (G - B) / chroma, G: 2 + (B - R) / chroma, B: 4 + (R - G) / chroma.
    # A gray pixel has a zero numerator: any divisor keeps its hue finite, and chroma 0 keeps it gray.
    num = (g - b).mul_(is_r).addcmul_(b - r, is_g).addcmul_(r - g, is_b)
    h6 = num.div_(chroma.clamp_min(1e-12)).add_(is_g, alpha=2.0).add_(is_b, alpha=4.0).add_(6.0 * f.view(-1, 1, 1))
    k = torch.stack([h6 + 5.0, h6 + 3.0, h6 + 1.0], dim=1)  # (B, 3, H, W): n = 5, 3, 1 for R, G, B
    k.sub_(torch.floor(k * (1 / 6)), alpha=6.0)  # mod 6
    tri = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return tri.mul_(chroma[:, None]).neg_().add_(maxc[:, None])


#: The jitter's four operations, in torchvision's order of its factors.
COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
_COMPILED: dict[str, Callable] = {}
#: Names of the functions whose compilation failed in this process (they run uncompiled).
FELL_BACK: set[str] = set()


def compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` through ``torch.compile`` (any batch size without recompiling), once per process;
    where compiling fails (no C++ compiler for the CPU backend, no Triton for a GPU) it warns
    once and runs ``fn`` as it is."""
    if fn.__name__ in _COMPILED:
        return _COMPILED[fn.__name__]
    # Inductor's errors (no C++ compiler, a failed build) derive from BackendCompilerFailed.
    from torch._dynamo.exc import BackendCompilerFailed  # a second to import: only views.compile needs it

    state = {"fn": torch.compile(fn, dynamic=True)}

    def call(*args: torch.Tensor) -> torch.Tensor:
        try:
            return state["fn"](*args)
        except BackendCompilerFailed as e:  # compiling failed; errors of the computation itself propagate
            warnings.warn(
                f"torch.compile failed for {fn.__name__} ({type(e).__name__}); it runs uncompiled", stacklevel=2
            )
            state["fn"] = fn
            FELL_BACK.add(fn.__name__)
            return fn(*args)

    _COMPILED[fn.__name__] = call
    return call


def color_ops(compile: bool = False) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...]:
    """The four jitter operations, compiled or not. Compiled, each is one fused loop over the
    pixels instead of a dozen passes over memory (hue: 8.3 -> 1.8 ms for 400 CIFAR images on one
    CPU thread), after a compilation of about 15 s that Inductor caches on disk for later runs."""
    return tuple(compiled(op) for op in COLOR_OPS) if compile else COLOR_OPS


def color_jitter(
    x: torch.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
    generator: torch.Generator | None = None,
    ops: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] | None = None,
) -> torch.Tensor:
    """torchvision's ColorJitter, per image, for a batch, applied with probability ``p``.

    As torchvision: brightness, contrast and saturation factors uniform in [1 - s, 1 + s], the
    hue shift uniform in [-hue, hue] of a turn (HSV), the four applied in a random order drawn
    per image. Each operation runs once over the images that have it at that position.
    Shapes: (B, 3, H, W) floats in [0, 1] -> same.
    """
    b, dev = x.shape[0], x.device
    factors = [1 - s + 2 * s * uniform(b, generator, dev) for s in (brightness, contrast, saturation)]
    factors.append((2 * uniform(b, generator, dev) - 1) * hue)
    order = uniform(4 * b, generator, dev).view(b, 4).argsort(dim=1)  # a uniform permutation per image
    apply = uniform(b, generator, dev) < p
    ops = ops or COLOR_OPS
    active = (brightness > 0, contrast > 0, saturation > 0, hue > 0)
    # Which operation each image gets at each position, 4 for none (not jittered); one stable
    # sort per position lines the images up by it, and one read of the 4 x 5 group sizes is the
    # only host synchronization (a nonzero per position and operation made sixteen).
    key = torch.where(apply[:, None], order, 4)
    groups = key.argsort(dim=0, stable=True)  # (B, 4): image indices grouped by operation
    sizes = F.one_hot(key, 5).sum(0).tolist()  # [position][operation]
    y = x.clone()
    for position in range(4):
        start = 0
        for k, (op, on) in enumerate(zip(ops, active, strict=True)):
            n = sizes[position][k]
            if on and n:
                idx = groups[start : start + n, position]
                y.index_copy_(0, idx, op(y.index_select(0, idx), factors[k].index_select(0, idx)))
            start += n
    return y


def _draw_gray(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, 1, 1, 1): 1.0 for the images to turn gray (probability ``p``), else 0.0."""
    return (uniform(x.shape[0], generator, x.device) < p).to(x.dtype).view(-1, 1, 1, 1)


def mix_gray(x: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) where ``gray`` (B, 1, 1, 1) is 1, their luma in all three channels."""
    # lerp with weights 0 and 1 gives either end exactly, many times faster than where on the CPU.
    return torch.lerp(x, grayscale(x).expand_as(x), gray)


def gray_and_normalize(x: torch.Tensor, gray: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """:func:`mix_gray` then the normalization ``x * scale + shift`` (scale, shift: (1, 3, 1, 1)):
    one function so that, compiled, it is one pass over the pixels."""
    return mix_gray(x, gray) * scale + shift


def random_gaussian_blur(
    x: torch.Tensor,
    p: float | torch.Tensor = 0.5,
    sigma: tuple[float, float] = (0.1, 2.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Blur with a per-image sigma (kernel ~10% of the image side), with probability ``p`` (a
    number, or (B,) per image).

    A separable depthwise convolution with one kernel per image (grouped conv).
    """
    b, c, h, w = x.shape
    dev = x.device
    radius = max(1, int(0.05 * min(h, w)))
    s = sigma[0] + (sigma[1] - sigma[0]) * uniform(b, generator, dev)
    t = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * s[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # (B, 2r+1)
    k = k.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c).reshape(b, c, h, w)
    apply = (uniform(b, generator, dev) < p).view(b, 1, 1, 1)
    return torch.where(apply, y, x)


def random_solarize(
    x: torch.Tensor, p: float | torch.Tensor, threshold: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Invert the pixels at or above ``threshold`` (``1 - x``), per image with probability ``p``
    (a number, or (B,) per image): PIL's solarize at 128 of 255, as BYOL's views use it.

    Shapes: (B, C, H, W) float in [0, 1] -> the same."""
    b = x.shape[0]
    apply = (uniform(b, generator, x.device) < p).view(b, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1 - x, x)


class SimCLRViews(nn.Module):
    """Two independently augmented, normalized views of a uint8 image batch.

    Recipe (SimCLR): random resized crop with scale (0.08, 1) and a horizontal flip, color
    jitter (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with p=0.2, Gaussian blur with p=0.5
    for images above 32 pixels, then channel normalization.

    Args:
        image_size: side S of the output views; None: the side of the input images.
        blur: None means on for views larger than 32 pixels.
        blur_p: the blur's probability in the first and the second view (BYOL: 1.0 and 0.1),
            at any size; None: ``blur``'s rule at SimCLR's 0.5.
        solarize_p: the probability of :func:`random_solarize` in each view (BYOL: 0 and 0.2).
        compile: the color operations through ``torch.compile`` (:func:`color_ops`).
    Shapes:
        (B, 3, H, W) uint8 on any device -> two (B, 3, S, S) float tensors.
    """

    def __init__(
        self,
        image_size: int | None = 32,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        jitter_strength: float = 1.0,
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur: bool | None = None,
        blur_p: tuple[float, float] | None = None,
        solarize_p: tuple[float, float] = (0.0, 0.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        # Pairs, also where a config gives lists.
        self.scale = (scale[0], scale[1])
        self.ratio = (ratio[0], ratio[1])
        self.jitter = tuple(v * jitter_strength for v in (0.4, 0.4, 0.4, 0.1))
        self.jitter_p = jitter_p
        self.gray_p = gray_p
        self.blur = blur
        self.blur_p = None if blur_p is None else (blur_p[0], blur_p[1])
        self.solarize_p = (solarize_p[0], solarize_p[1])
        self.mean, self.std = tuple(mean), tuple(std)
        # Not self.compile: that would hide nn.Module.compile().
        self.compile_color = compile

    def view(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        pair: bool = False,
        size: int | None = None,
    ) -> torch.Tensor:
        """One augmented view: (B, 3, H, W) uint8 -> (B, 3, S, S) float, normalized (``pair``:
        the batch is the first views' images, then the second's; see :meth:`finish`); ``size``
        overrides S."""
        size = size or self.image_size or images.shape[-1]
        x = random_resized_crop(to_float(images), size, self.scale, self.ratio, generator=generator)
        return self.finish(x, generator, pair)

    def finish(self, crops: torch.Tensor, generator: torch.Generator | None = None, pair: bool = False) -> torch.Tensor:
        """The steps after the crop (color jitter, grayscale, blur, solarization, normalization),
        for crops already cut and flipped, e.g. from the full image in the loader's workers
        (``selfsup.data.litdata.samples.CropViews``): (B, 3, S, S) uint8 or float -> float.
        With ``pair`` the first half of the batch takes the first view's blur and solarization
        probabilities and the second half the second's; without, all take the first's."""
        x = to_float(crops)
        size = x.shape[-1]
        b, c, s, h = self.jitter
        # The compiled functions are looked up, not kept: the module stays picklable.
        x = color_jitter(x, b, c, s, h, p=self.jitter_p, generator=generator, ops=color_ops(self.compile_color))
        gray = _draw_gray(x, self.gray_p, generator)
        blur = self.blur_p is not None or (self.blur if self.blur is not None else size > 32)
        if blur or any(self.solarize_p):
            x = mix_gray(x, gray)
            if blur:
                p = 0.5 if self.blur_p is None else self.per_view(self.blur_p, x, pair)
                x = random_gaussian_blur(x, p=p, generator=generator)
            if any(self.solarize_p):
                x = random_solarize(x, self.per_view(self.solarize_p, x, pair), generator=generator)
            return normalize(x, self.mean, self.std)
        tail = compiled(gray_and_normalize) if self.compile_color else gray_and_normalize
        return tail(x, gray, *standardization(x, self.mean, self.std))

    @staticmethod
    def per_view(p: tuple[float, float], x: torch.Tensor, pair: bool) -> torch.Tensor:
        """(B,) probabilities: ``p[0]`` for the first half of the batch and ``p[1]`` for the second
        when it holds a pair of views, else ``p[0]`` for all."""
        first = x.shape[0] // 2 if pair else x.shape[0]
        return torch.cat([torch.full((first,), p[0]), torch.full((x.shape[0] - first,), p[1])]).to(x.device)

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Both views in one pass over the batch twice over: every draw is per image anyway, and
        # at training batch sizes the per-operation overhead is a fifth of the cost.
        v0, v1 = self.view(torch.cat([images, images]), generator, pair=True).chunk(2)
        return v0, v1

    @torch.no_grad()
    def of_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of a training batch: cut here from ``image`` uint8 (B, 3, H, W), or
        finished from the crops the workers cut from the full images, ``views`` (B, 2, 3, S, S)."""
        if "views" in batch:
            v = batch["views"]
            v0, v1 = self.finish(torch.cat([v[:, 0], v[:, 1]]), pair=True).chunk(2)
            return v0, v1
        return self(batch["image"])


@dataclass(frozen=True)
class ViewSpec(PlainData):
    """The views of a contrastive stage (one typed argument; SimCLR's recipe otherwise).

    Args:
        size: side of the views; None: the side of the input images.
        crop_min_scale: smallest area fraction of the random resized crop (SimCLR: 0.08).
        compile: the color jitter's operations through ``torch.compile``: 2-4 times faster
            each, after a one-off compilation (about 15 s on two CPU cores, cached on disk).
        blur_p: the blur's probability in the first and second view, at any size (BYOL's
            asymmetric views: [1.0, 0.1]); None: SimCLR's 0.5, above 32 pixels only.
        solarize_p: the solarization's probability in each view (BYOL: [0.0, 0.2]).
    """

    size: int | None = None
    crop_min_scale: float = 0.08
    compile: bool = False
    blur_p: tuple[float, float] | None = None
    solarize_p: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        check_ranges(
            "model.init_args.views", {"size": (self.size, Range(8)), "crop_min_scale": (self.crop_min_scale, AREA)}
        )
        chances: dict[str, tuple[float | None, Range]] = {
            f"blur_p[{i}]": (p, PROBABILITY) for i, p in enumerate(self.blur_p or ())
        }
        chances |= {f"solarize_p[{i}]": (p, PROBABILITY) for i, p in enumerate(self.solarize_p)}
        check_ranges("model.init_args.views", chances)

    def build(self) -> SimCLRViews:
        return SimCLRViews(
            self.size,
            scale=(self.crop_min_scale, 1.0),
            blur_p=self.blur_p,
            solarize_p=self.solarize_p,
            compile=self.compile,
        )


class MultiCropViews(nn.Module):
    """DINO's multi-crop views (Caron et al. 2021, section 3 and App. "Data augmentation"; Caron
    et al. 2020 for multi-crop): 2 global crops of a large share of the image at ``global_size``
    and ``num_local`` local crops of a small share at ``local_size``, each augmented as BYOL's
    views are (colour jitter, grayscale; blur always in the first global crop, with p=0.1 in the
    second and 0.5 in the local ones; solarisation with p=0.2 in the second global crop).

    All crops of a batch are cut and augmented on the device in two batched passes: one over
    the 2B global crops, one over the ``num_local`` x B local crops.

    Shapes: (B, 3, H, W) uint8 -> a list of 2 + num_local float tensors, the global crops
    (B, 3, G, G) first, then the local ones (B, 3, L, L); G None: H; L None: G // 2.
    """

    def __init__(
        self,
        global_size: int | None = None,
        local_size: int | None = None,
        num_local: int = 6,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        global_blur_p: tuple[float, float] = (1.0, 0.1),
        local_blur_p: float = 0.5,
        solarize_p: tuple[float, float] = (0.0, 0.2),
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.num_local = num_local
        self.global_views = SimCLRViews(
            global_size, scale=global_scale, blur_p=global_blur_p, solarize_p=solarize_p, compile=compile
        )
        self.local_views = SimCLRViews(
            local_size, scale=local_scale, blur_p=(local_blur_p, local_blur_p), compile=compile
        )

    @property
    def image_size(self) -> int | None:
        """The global crops' side (None: the input's), as ``SimCLRViews.image_size``."""
        return self.global_views.image_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        views = list(self.global_views.view(torch.cat([images, images]), generator, pair=True).chunk(2))
        if self.num_local:
            size = self.local_views.image_size or views[0].shape[-1] // 2
            local = self.local_views.view(images.repeat(self.num_local, 1, 1, 1), generator, size=size)
            views += list(local.chunk(self.num_local))
        return views


@dataclass(frozen=True)
class MultiCropSpec(PlainData):
    """DINO's multi-crop views as one typed argument (see :class:`MultiCropViews`).

    Args:
        global_size: side of the 2 global crops; None: the input images' side.
        local_size: side of the local crops (96 at 224 px in the paper; a multiple of the ViT's
            patch size keeps every pixel in a patch); None: half the global crops' side.
        num_local: how many local crops (0 to 10; the paper's ViT-S/16 recipe: 10).
        global_scale / local_scale: area shares of the crops (paper: (0.4, 1) and (0.05, 0.4)).
        global_blur_p: the blur's probability in each global crop; local_blur_p: in the local ones.
        solarize_p: the solarisation's probability in each global crop.
        compile: the colour operations through ``torch.compile`` (as ``ViewSpec.compile``).
    """

    global_size: int | None = None
    local_size: int | None = None
    num_local: int = 6
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    global_blur_p: tuple[float, float] = (1.0, 0.1)
    local_blur_p: float = 0.5
    solarize_p: tuple[float, float] = (0.0, 0.2)
    compile: bool = False

    def __post_init__(self) -> None:
        chances: dict[str, tuple[float | None, Range]] = {
            "global_size": (self.global_size, Range(8)),
            "local_size": (self.local_size, Range(4)),
            "num_local": (self.num_local, Range(0, 32)),
            "local_blur_p": (self.local_blur_p, PROBABILITY),
        }
        for name in ("global_scale", "local_scale"):
            chances |= {f"{name}[{i}]": (v, AREA) for i, v in enumerate(getattr(self, name))}
        for name in ("global_blur_p", "solarize_p"):
            chances |= {f"{name}[{i}]": (v, PROBABILITY) for i, v in enumerate(getattr(self, name))}
        check_ranges("model.init_args.crops", chances)

    def build(self) -> MultiCropViews:
        return MultiCropViews(
            self.global_size,
            self.local_size,
            self.num_local,
            (self.global_scale[0], self.global_scale[1]),
            (self.local_scale[0], self.local_scale[1]),
            (self.global_blur_p[0], self.global_blur_p[1]),
            self.local_blur_p,
            (self.solarize_p[0], self.solarize_p[1]),
            self.compile,
        )
