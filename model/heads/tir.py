"""TIR (text-guided image restoration) of UIT / SEN: restore an image's colour patches from a
grayscale, 70%-masked copy and the caption.

The augmented batch image is turned grayscale and encoded a second time by the same ViT with most
patch tokens dropped (``CLIPEncoder.encode_image(..., keep_patches=...)``). A decoder puts learned
mask tokens at the dropped positions, adds a fixed 2-D sin-cos grid embedding, replaces every
token by a cross-attention read of the caption's text tokens (no residual: colour has to come
from the text), runs self-attention blocks and predicts each patch's RGB pixels. The loss is the
MSE over masked patches of the colour image. Nothing of this runs at evaluation.
"""
from __future__ import annotations

import torch
from torch import nn

from utils.errors import ConfigError
from utils.settings import PROBABILITY, Setting

from ..blocks import LayerNorm, MultiheadAttention, Transformer
from ..objectives import masked_patch_mse
from .base import Head
from .contrastive import loss_weight
from .registry import register_head

GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R 601 luma, applied to the CLIP-normalised channels


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma of the (normalised) RGB channels, repeated to 3 channels: [B, 3, H, W] -> same shape.

    As SEN, on the already normalised tensor (luma of normalised values, not normalise-after-gray).
    """
    weights = images.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True).expand_as(images)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C]: patches row-major over the grid, and inside a patch
    the pixel row slowest, then the pixel column, then the channel (SEN's layout)."""
    batch, channels, height, width = images.shape
    gh, gw = height // patch, width // patch
    x = images.reshape(batch, channels, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, gh * gw, patch * patch * channels)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Inverse of ``patchify`` for a (rows, cols) grid: [B, rows*cols, p*p*C] -> [B, C, H, W]."""
    batch, _, values = patches.shape
    rows, cols = grid
    channels = values // (patch * patch)
    x = patches.reshape(batch, rows, cols, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, rows * patch, cols * patch)


def restoration_target(images: torch.Tensor, patch: int, norm_pix: bool = False) -> torch.Tensor:
    """The colour patches to restore, [B, N, p*p*3]; with ``norm_pix`` each patch is standardised
    by its own mean and (unbiased) variance, as MAE's norm_pix_loss (SEN: off)."""
    target = patchify(images, patch)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return target


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (MAE convention) of a (rows, cols) grid with a zero CLS row first:
    [1 + rows*cols, dim]. The first half of the dims encodes the column, the second half the row;
    each half is D/4 sines then D/4 cosines at frequencies 10000^(-k/(D/4)). Computed in float64
    and rounded once; SEN evaluates it in float32 numpy, whose entries are off by up to ~3e-6."""
    if dim % 4:
        raise ConfigError(f"the TIR decoder width {dim} must be divisible by 4 (2-D sin-cos embedding)")
    rows, cols = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    row, col = torch.meshgrid(torch.arange(rows, dtype=torch.float64),
                              torch.arange(cols, dtype=torch.float64), indexing="ij")

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(col), encode(row)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()


def tokens_kept(num_patches: int, mask_ratio: float) -> int:
    """Encoder tokens kept, CLS included: int((1 + N) * (1 - ratio)) in floating point (SEN)."""
    return int((num_patches + 1) * (1 - mask_ratio))


def random_patch_order(batch: int, num_patches: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random permutation of the patches per sample (``ids_shuffle``, kept patches first) and its
    inverse (``ids_restore``: each patch position's rank in the shuffled order)."""
    ids_shuffle = torch.rand(batch, num_patches, device=device).argsort(dim=1)
    return ids_shuffle, ids_shuffle.argsort(dim=1)


@register_head
class TIRHead(Head):
    name = "tir"
    method = "UIT"
    summary = "text-guided image restoration: colour patches restored from a masked grayscale pass"
    # Defaults are SEN's released recipe; the switches off = as SEN.
    settings = (
        loss_weight("tir", 10.0),
        Setting("tir_mask_ratio", 0.7, "share of patches dropped: the encoder keeps "
                "int((1 + patches) * (1 - ratio)) tokens, CLS included", **PROBABILITY),
        Setting("tir_depth", 4, "decoder self-attention blocks", low=1),
        Setting("tir_gray", True, "the masked pass sees the grayscale image (the target stays colour)"),
        Setting("tir_norm_pix", False, "normalise each target patch (MAE's norm_pix_loss; SEN: off)"),
        Setting("tir_mask_exact", False, "supervise every dropped patch (SEN leaves one out: off-by-one quirk)"),
        Setting("tir_residual", False, "residual around the text cross-attention (SEN: none)"),
        Setting("tir_text_pad_mask", False, "cross-attention ignores text padding after EOT (SEN attends to it)"),
    )
    # SEN's substring rules give the text cross-attention and the decoder blocks lr x lr_factor;
    # decoder_embed, decoder_pred, mask_token and the LayerNorms train at the base lr.
    param_roles = {"cross_attn": "cross", "decoder": "cross"}

    def __init__(self, embed_dim: int, grid: tuple[int, int], patch: int, mask_ratio: float = 0.7,
                 depth: int = 4, gray: bool = True, norm_pix: bool = False, mask_exact: bool = False,
                 residual: bool = False, text_pad_mask: bool = False, weight: float = 10.0):
        super().__init__(weight)
        num_patches = grid[0] * grid[1]
        self.keep = tokens_kept(num_patches, mask_ratio)
        if not 1 <= self.keep <= num_patches:
            raise ConfigError(f"tir_mask_ratio {mask_ratio} keeps {self.keep - 1} of {num_patches} patches; "
                              "it must leave at least one patch masked (0 <= ratio < 1)")
        self.grid, self.num_patches, self.patch = grid, num_patches, patch
        self.gray, self.norm_pix = gray, norm_pix
        self.mask_exact, self.residual, self.text_pad_mask = mask_exact, residual, text_pad_mask
        heads = embed_dim // 64 or 1
        self.norm_1 = LayerNorm(embed_dim)  # encoder image tokens
        self.norm_2 = LayerNorm(embed_dim)  # text tokens (keys and values)
        self.decoder_embed = nn.Linear(embed_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # zeros, as SEN (not MAE's normal)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, grid), persistent=False)
        self.norm_4 = LayerNorm(embed_dim)  # cross-attention queries
        self.cross_attn = MultiheadAttention(embed_dim, heads)
        self.norm_6 = LayerNorm(embed_dim)
        self.decoder = Transformer(embed_dim, depth, heads)
        self.norm_7 = LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch * patch * 3)
        scale = embed_dim ** -0.5
        proj_std = scale * (2 * depth) ** -0.5
        self.decoder.init_weights(scale, proj_std, (2 * embed_dim) ** -0.5)
        nn.init.normal_(self.cross_attn.in_proj_weight, std=scale)
        nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        patch, (height, width) = encoder_cfg.vision_patch_size, encoder_cfg.image_size
        if encoder_cfg.stride_size != patch or height % patch or width % patch:
            raise ConfigError(f"the tir head needs non-overlapping patches covering the image: image "
                              f"{height}x{width}, patch {patch}, stride {encoder_cfg.stride_size}")
        return cls(encoder_cfg.embed_dim, encoder_cfg.grid_size, patch, cfg.tir_mask_ratio, cfg.tir_depth,
                   cfg.tir_gray, cfg.tir_norm_pix, cfg.tir_mask_exact, cfg.tir_residual,
                   cfg.tir_text_pad_mask, cfg.tir_loss_weight)

    def patch_order(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids_shuffle, ids_restore) of this step: a fresh random mask per sample."""
        images = batch["images"]
        return random_patch_order(images.shape[0], self.num_patches, images.device)

    def loss_mask(self, ids_restore: torch.Tensor) -> torch.Tensor:
        """1 at the patches the loss supervises. SEN marks ranks >= keep, so the last dropped patch
        (rank keep-1) is reconstructed but not supervised [quirk]; ``mask_exact`` marks every dropped one."""
        first_masked = self.keep - 1 if self.mask_exact else self.keep
        return (ids_restore >= first_masked).float()

    def unshuffle(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """[B, keep, D] (CLS, then the kept patches in shuffled order) -> [B, 1+N, D] in grid order,
        with ``mask_token`` at every dropped patch."""
        batch, num_patches = ids_restore.shape
        masks = self.mask_token.to(x.dtype).expand(batch, num_patches + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masks], dim=1)
        patches = patches.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], patches], dim=1)

    def decode(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, ids_restore: torch.Tensor,
               text_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder tokens of the kept patches ([B, keep, E], CLS first) and text tokens -> per-patch
        pixel predictions [B, N, p*p*3]."""
        x = self.unshuffle(self.decoder_embed(self.norm_1(image_tokens)), ids_restore)
        x = x + self.pos_embed.to(x.dtype)
        text = self.norm_2(text_tokens)
        read = self.cross_attn(self.norm_4(x), text, text, key_mask=text_keep)
        x = self.norm_6(x + read if self.residual else read)  # SEN: no residual [quirk]
        x = self.norm_7(self.decoder(x))
        return self.decoder_pred(x)[:, 1:]

    def restore(self, batch, out, encoder) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted patches [B, N, p*p*3] (fp32) and ``ids_restore`` of the mask drawn for them."""
        images = batch["images"]
        ids_shuffle, ids_restore = self.patch_order(batch)
        inputs = to_grayscale(images) if self.gray else images
        tokens = encoder.encode_image(inputs, keep_patches=ids_shuffle[:, :self.keep - 1])
        text_keep = None
        if self.text_pad_mask:
            ids = batch["caption_ids"]
            positions = torch.arange(ids.shape[1], device=ids.device)
            text_keep = positions <= ids.argmax(dim=-1, keepdim=True)  # up to EOT
        # The first pass's text tokens: the text encoder has no dropout, so re-encoding the same
        # caption (as SEN does) gives the same values and gradients at twice the text compute.
        return self.decode(tokens, out.text.tokens, ids_restore, text_keep).float(), ids_restore

    def forward(self, batch, out, encoder):
        pred, ids_restore = self.restore(batch, out, encoder)
        target = restoration_target(batch["images"].float(), self.patch, self.norm_pix)
        mse = masked_patch_mse(pred, target, self.loss_mask(ids_restore))
        return {"tir_loss": self.weight * mse}
