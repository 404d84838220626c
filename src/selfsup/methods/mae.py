"""MAE: masked autoencoders (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR
2022): a pretext task, restore the hidden three quarters of an image from the rest."""

from __future__ import annotations

from typing import Any, Protocol, cast

import lightning as L
import torch
from torch import nn

from selfsup.config import AREA, COUNT, SHARE, check_ranges, save_plain_hyperparameters
from selfsup.data.litdata.samples import CropViews
from selfsup.data.views import normalize, random_resized_crop, to_float
from selfsup.evaluation.online import OnlineEvaluation, OnlineHooks, OnlineSpec
from selfsup.losses.mae import mae_loss, patchify, random_masking, unpatchify
from selfsup.media import ReconstructionFigure, denormalize
from selfsup.models.backbones import BackboneSpec, vision_transformer
from selfsup.optim.optimizer import OptimizerSpec
from selfsup.protocols import StageHparams


class MAEHparams(StageHparams, Protocol):
    """:class:`MAE`'s hyperparameters, read through :attr:`MAE.hp`."""

    mask_ratio: float
    norm_pix_loss: bool
    crop_min_scale: float
    online: dict
    num_classes: int | None


class MAEDecoder(nn.Module):
    """MAE's light decoder: the encoder's tokens projected to ``dim``, a learnt mask token in
    every hidden place, fixed 2-D sine-cosine positions, ``depth`` transformer blocks, then a
    linear layer to each patch's pixels.

    Shapes: (B, P + K, E) encoded tokens (P prefix tokens, K kept patches) -> (B, N, p * p * 3).
    """

    def __init__(self, embed_dim: int, patch_pixels: int, dim: int = 512, depth: int = 8, heads: int = 16) -> None:
        super().__init__()
        # timm is an optional extra: MAE's backbone is a timm ViT, so timm is there by now.
        from timm.layers import build_sincos2d_pos_embed
        from timm.models.vision_transformer import Block  # (the same optional extra)

        self.positions = build_sincos2d_pos_embed  # fixed 2-D sine-cosine positions of a grid
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():  # as MAE's code: xavier weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, restore: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
        x = self.embed(tokens)
        b, n = restore.shape
        patches = torch.cat([x[:, prefix:], self.mask_token.expand(b, n - (x.shape[1] - prefix), -1)], dim=1)
        # Back to the image's order: kept patches where they were, mask tokens everywhere else.
        patches = patches.gather(1, restore[..., None].expand(-1, -1, x.shape[-1]))
        pos = self.positions(list(grid), x.shape[-1], device=x.device, dtype=x.dtype)
        x = torch.cat([x[:, :prefix], patches + pos], dim=1)
        return self.pred(self.norm(self.blocks(x)))[:, prefix:]


class MAE(L.LightningModule):
    """A vision transformer encodes a random quarter of each image's patches; a light decoder
    restores the pixels of the hidden ones from the encoding and mask tokens; the loss is the
    mean squared error on the hidden patches only, of per-patch normalised pixels.

    The encoder sees only the kept patches (with their position embeddings; the class token
    too), so it costs about a quarter of a full pass. Masks are drawn per image in one batched
    call (:func:`~selfsup.losses.mae.random_masking`) from torch's seeded generator. Views: a
    random resized crop (area share ``crop_min_scale`` to 1) and a flip, nothing else.

    After each validation the reconstruction of 8 fixed images (original, masked, restored)
    is drawn as ``val/reconstruction`` in W&B and ``val_reconstruction.png`` in the run folder.

    Args:
        backbone: a timm vision transformer (``timm:vit_*``; ``image_size`` / ``patch_size`` for
            small images); ``pool: avg`` is MAE's choice for fine-tuning.
        mask_ratio: share of each image's patches hidden (0.75).
        decoder_dim / decoder_depth / decoder_heads: the decoder (paper: 512, 8, 16).
        norm_pix_loss: the target is each patch's pixels normalised by its own mean and variance.
        crop_min_scale: the smallest area share of the crop (0.2).
        optimizer / online / num_classes: as in ``SimCLR`` (the paper: AdamW (0.9, 0.95), lr
            1.5e-4 per 256 images, weight decay 0.05, 40 warm-up epochs, cosine).
    """

    def __init__(
        self,
        backbone: BackboneSpec | None = None,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        crop_min_scale: float = 0.2,
        optimizer: OptimizerSpec = OptimizerSpec(name="adamw", lr=1.5e-4, weight_decay=0.05),
        online: OnlineSpec = OnlineSpec(),
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        check_ranges(
            "model.init_args",
            {
                "mask_ratio": (mask_ratio, SHARE),
                "decoder_dim": (decoder_dim, COUNT),
                "decoder_depth": (decoder_depth, COUNT),
                "decoder_heads": (decoder_heads, COUNT),
                "crop_min_scale": (crop_min_scale, AREA),
            },
        )
        self.backbone = BackboneSpec.of(backbone).build()
        vit = vision_transformer(self.backbone, "MAE")
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.decoder = MAEDecoder(vit.embed_dim, self.patch_size**2 * 3, decoder_dim, decoder_depth, decoder_heads)
        self.online = OnlineEvaluation(OnlineSpec.of(online), self.backbone.num_features, num_classes)

    @property
    def hp(self) -> MAEHparams:
        """The hyperparameters, typed (Lightning types ``hparams`` as a plain mapping)."""
        return cast(MAEHparams, self.hparams)

    @property
    def vit(self) -> Any:
        """The timm VisionTransformer inside the backbone."""
        return cast(Any, self.backbone).model

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features of plain uint8 images, all patches (no mask): (B, F)."""
        return self.backbone(normalize(to_float(images)))

    def encode(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The encoder on the kept patches of normalised images x (B, 3, H, W): the tokens
        (B, P + K, E), prefix (class) tokens first, and the patch grid (rows, columns)."""
        vit = self.vit
        tokens = vit.patch_embed(x)  # (B, rows, columns, E) with dynamic_img_size, else (B, N, E)
        grid = tuple(tokens.shape[1:3]) if tokens.ndim == 4 else tuple(vit.patch_embed.grid_size)
        # timm's own step: position embeddings (interpolated to this grid) on every patch, then
        # the class token in front; the hidden patches are dropped after it, as in MAE.
        tokens = vit._pos_embed(tokens)
        prefix = vit.num_prefix_tokens
        kept = tokens[:, prefix:].gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        tokens = vit.norm_pre(torch.cat([tokens[:, :prefix], kept], dim=1))
        return vit.norm(vit.blocks(tokens)), (int(grid[0]), int(grid[1]))

    def crops(self, batch: dict) -> torch.Tensor:
        """The batch's normalised training crops: (B, 3, S, S) float."""
        if "views" in batch:  # cut from the full image by a streamed dataset's workers
            return normalize(to_float(batch["views"][:, 0]))
        images = batch["image"]
        x = random_resized_crop(to_float(images), images.shape[-1], (self.hp.crop_min_scale, 1.0))
        return normalize(x)

    def loss(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE's loss on normalised images x (B, 3, H, W); with the encoder's pooled features of
        the kept patches (B, F), the predicted patches (B, N, p * p * 3) and the mask (B, N)."""
        b = x.shape[0]
        n = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
        keep, mask, restore = random_masking(b, n, self.hp.mask_ratio, generator, x.device)
        tokens, grid = self.encode(x, keep)
        prediction = self.decoder(tokens, restore, self.vit.num_prefix_tokens, grid)
        loss = mae_loss(prediction, patchify(x, self.patch_size), mask, self.hp.norm_pix_loss)
        return loss, self.vit.forward_head(tokens, pre_logits=True), prediction, mask

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Uint8 images (B, 3, H, W) masked (hidden patches gray) and restored (the prediction in
        the hidden patches, the image in the kept ones), both uint8 (B, 3, H, W)."""
        x = normalize(to_float(images))
        _, _, prediction, mask = self.loss(x, generator)
        target = patchify(x, self.patch_size)
        if self.hp.norm_pix_loss:  # the prediction is in each patch's own scale: undo it
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            prediction = prediction * (var + 1e-6).sqrt() + mean
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        hidden = mask[..., None]
        restored = unpatchify(torch.where(hidden, prediction, target), self.patch_size, grid)
        gray = normalize(torch.full_like(x, 0.5))
        masked = unpatchify(torch.where(hidden, patchify(gray, self.patch_size), target), self.patch_size, grid)
        return denormalize(masked), denormalize(restored)

    @property
    def probe_input_norm(self) -> str:
        """Probes read the encoder as it saw its crops: ImageNet channel statistics."""
        return "channel"

    def stream_sample(self, image_size: int) -> CropViews:
        """On a streamed dataset the workers cut the one crop from the full images."""
        return CropViews(1, image_size, (self.hp.crop_min_scale, 1.0))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, features, _, _ = self.loss(self.crops(batch))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return loss + self.online.training_loss(self, features, batch["label"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        # Masks drawn from a generator fixed per batch: the same every evaluation, so comparable.
        g = torch.Generator(device=images.device).manual_seed(1000 + batch_idx)
        loss = self.loss(normalize(to_float(images)), g)[0]
        self.log("val/loss", loss, prog_bar=True, batch_size=images.shape[0], sync_dist=True)
        self.online.validation_update(self, self.embed(images), batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return OptimizerSpec.of(self.hp.optimizer).build([self.backbone, self.decoder], self.online.param_groups())

    def configure_callbacks(self) -> list[L.Callback]:
        return [OnlineHooks(), ReconstructionFigure()]
