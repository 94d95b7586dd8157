"""CLIP dual encoder: ViT image tower and causal text Transformer (OpenAI's parameter names).

``encode_image`` returns every visual token after ``ln_post`` and ``proj`` ([B, 1+N, E]; the
global feature is token 0, CLS); ``encode_text`` returns every text token after ``ln_final`` and
``text_projection`` ([B, L, E]; the global feature is the EOT token, found as argmax of the ids).
``image_output`` / ``text_output`` give one pass's public outputs at once: the tokens before the
projection (``hidden``), after it (``tokens``) and the global feature. The encoder knows nothing
about training heads.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .blocks import LayerNorm, Transformer


@dataclass
class ImageOutput:
    """One image pass: every token before and after the projection, and the global feature."""
    tokens: torch.Tensor          # [B, 1+N, E] after ln_post and proj; token 0 = CLS
    global_feature: torch.Tensor  # [B, E] fp32: the CLS token
    hidden: torch.Tensor | None = None  # [B, 1+N, W] after ln_post, before proj (vision width)
    attention: torch.Tensor | None = None  # [B, 1+N] the last block's head-averaged CLS attention row


@dataclass
class TextOutput:
    """One text pass: the ids, every token before and after the projection, and the global feature."""
    ids: torch.Tensor             # [B, L]
    tokens: torch.Tensor          # [B, L, E] after ln_final and text_projection
    global_feature: torch.Tensor  # [B, E] fp32: the EOT token
    hidden: torch.Tensor | None = None  # [B, L, W] after ln_final, before text_projection (text width)
    attention: torch.Tensor | None = None  # [B, L] the last block's head-averaged EOT attention row

    @property
    def eot_index(self) -> torch.Tensor:
        """Position of EOT (49407, the largest id) in each caption, [B]."""
        return self.ids.argmax(dim=-1)


@dataclass
class CLIPConfig:
    """Architecture of the dual encoder; inferred from a checkpoint or given for training from scratch."""
    embed_dim: int = 512
    vision_width: int = 768
    vision_layers: int = 12
    vision_patch_size: int = 16
    image_size: tuple[int, int] = (384, 128)  # H, W
    stride_size: int = 16
    text_width: int = 512
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    vision_heads: int = 0     # 0: width // 64 (OpenAI's rule)
    text_heads: int = 0
    quick_gelu: bool = True   # OpenAI's activation; open_clip / Hugging Face weights may use GELU

    def heads(self, tower: str) -> int:
        """Attention heads of the ``vision`` or ``text`` tower."""
        heads, width = (self.vision_heads, self.vision_width) if tower == "vision" else (self.text_heads,
                                                                                         self.text_width)
        return heads or width // 64 or 1

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, columns); leftover pixels at the bottom/right are ignored (IRRA)."""
        h, w = self.image_size
        p, s = self.vision_patch_size, self.stride_size
        return (h - p) // s + 1, (w - p) // s + 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        width = cfg.vision_width
        self.grid_size = cfg.grid_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.vision_patch_size, stride=cfg.stride_size,
                               bias=False)
        scale = width ** -0.5
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_patches + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.vision_layers, cfg.heads("vision"), cfg.quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus their position embedding, [B, N, W] (no CLS)."""
        x = self.conv1(images).flatten(2).transpose(1, 2)
        return x + self.positional_embedding[1:].to(x.dtype)

    def tokens(self, images: torch.Tensor, keep_patches: torch.Tensor | None = None) -> torch.Tensor:
        """The Transformer's input: CLS and the (kept) patch tokens with positions, after ln_pre."""
        patches = self.embed(images)
        if keep_patches is not None:  # drop tokens after the position embedding, before ln_pre
            index = keep_patches.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
            patches = patches.gather(1, index)
        cls = (self.class_embedding + self.positional_embedding[0]).to(patches.dtype)
        return self.ln_pre(torch.cat([cls.expand(patches.shape[0], 1, -1), patches], dim=1))

    def forward(self, images: torch.Tensor, keep_patches: torch.Tensor | None = None) -> torch.Tensor:
        return self.ln_post(self.transformer(self.tokens(images, keep_patches)))  # before ``proj``

    def forward_with_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` and the last block's head-averaged CLS attention row [B, 1+N]."""
        x = self.tokens(images)
        x, attention = self.transformer.forward_with_attention(x, x.new_zeros(len(x), dtype=torch.long))
        return self.ln_post(x), attention


class CLIPEncoder(nn.Module):
    """Image and text towers; state-dict keys are OpenAI CLIP's (without ``logit_scale``)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.heads("text"), cfg.quick_gelu)
        self.ln_final = LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.text_attn_dropout = 0.0
        self.pretrained_logit_scale: float | None = None  # ln of the loaded checkpoint's logit scale, if any
        self._init_weights()

    def _init_weights(self) -> None:
        """OpenAI CLIP's initialisation (used when training from scratch)."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights(width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5,
                                      (2 * width) ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)
        vwidth, vlayers = self.visual.transformer.width, self.visual.transformer.layers
        self.visual.transformer.init_weights(vwidth ** -0.5, vwidth ** -0.5 * (2 * vlayers) ** -0.5,
                                             (2 * vwidth) ** -0.5)

    def set_text_attn_dropout(self, p: float) -> None:
        """Dropout ``p`` on the attention probabilities of every text block, in training mode only
        (TBPS-CLIP: 0.05); the image tower stays deterministic."""
        self.text_attn_dropout = p
        for block in self.transformer.resblocks:
            block.attn.dropout = p

    def freeze_patch_embedding(self) -> None:
        """``visual.conv1`` gets no gradient and no optimizer state (TBPS-CLIP's "locking bottom layers")."""
        self.visual.conv1.weight.requires_grad_(False)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Trade compute for memory: recompute both towers' block activations during backward."""
        self.visual.transformer.grad_checkpointing = enabled
        self.transformer.grad_checkpointing = enabled

    def compile_towers(self) -> None:
        """torch.compile both towers in place (state-dict keys unchanged)."""
        self.visual.compile()
        self.transformer.compile()

    @property
    def embed_dim(self) -> int:
        return self.text_projection.shape[1]

    def encode_image(self, images: torch.Tensor, keep_patches: torch.Tensor | None = None) -> torch.Tensor:
        """All visual tokens after ``ln_post`` and ``proj``: [B, 1+N, E].

        ``keep_patches`` ([B, K] patch indices, row-major over the grid) encodes only those patches
        (MAE-style token dropping, e.g. for masked image modelling): the output is [B, 1+K, E], CLS
        first, then the kept patches in the given order. Dropped patches never enter the Transformer.
        """
        return self.visual(images, keep_patches) @ self.visual.proj

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """All text tokens after ``ln_final`` and ``text_projection``: [B, L, E]."""
        return self._text_hidden(text_ids) @ self.text_projection

    def _text_hidden(self, text_ids: torch.Tensor) -> torch.Tensor:
        return self.ln_final(self.text_states(text_ids))

    def text_states(self, text_ids: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
        """The text stream after the first ``blocks`` Transformer blocks (all by default), before
        ``ln_final``: [B, L, W]. For heads that continue from an intermediate layer."""
        return self.transformer(self.embed_text(text_ids), causal=True, blocks=blocks)

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings, [B, L, W]; L may be shorter than the context (the causal
        mask makes every token's output independent of the positions after it)."""
        return self.token_embedding(text_ids) + self.positional_embedding[:text_ids.shape[1]]

    def image_output(self, images: torch.Tensor, attention: bool = False) -> ImageOutput:
        """One pass over ``images``: hidden tokens, projected tokens and the CLS global feature (and,
        with ``attention``, the last block's CLS attention row, computed beside it without gradient)."""
        hidden, row = self.visual.forward_with_attention(images) if attention else (self.visual(images), None)
        tokens = hidden @ self.visual.proj
        return ImageOutput(tokens, self.image_global(tokens), hidden, row)

    def text_output(self, text_ids: torch.Tensor, attention: bool = False) -> TextOutput:
        """One pass over ``text_ids``: hidden tokens, projected tokens and the EOT global feature (and,
        with ``attention``, the last block's EOT attention row under the causal mask)."""
        if attention:
            x, row = self.transformer.forward_with_attention(self.embed_text(text_ids), text_ids.argmax(dim=-1),
                                                             causal=True)
            hidden = self.ln_final(x)
        else:
            hidden, row = self._text_hidden(text_ids), None
        tokens = hidden @ self.text_projection
        return TextOutput(text_ids, tokens, self.text_global(tokens, text_ids), hidden, row)

    @staticmethod
    def image_global(image_tokens: torch.Tensor) -> torch.Tensor:
        return image_tokens[:, 0].float()

    @staticmethod
    def text_global(text_tokens: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """The EOT token's feature; EOT (49407) is the largest id, so argmax finds it."""
        rows = torch.arange(text_tokens.shape[0], device=text_tokens.device)
        return text_tokens[rows, text_ids.argmax(dim=-1)].float()
