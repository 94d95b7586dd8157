"""IRR (implicit relation reasoning): masked language modelling of the caption with cross-attention
to the image tokens, then a 4-block Transformer and a vocabulary classifier (IRRA)."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import LayerNorm, MultiheadAttention, QuickGELU, Transformer
from utils.settings import Setting

from ..objectives import accuracy
from .base import Head
from .contrastive import loss_weight
from .registry import register_head


@register_head
class MLMHead(Head):
    name = "mlm"
    method = "IRRA"
    summary = "implicit relation reasoning: masked words predicted with cross-attention to the image"
    settings = (
        loss_weight("mlm"),
        Setting("cmt_depth", 4, "blocks of the mlm head's cross-modal Transformer (IRRA's name; "
                "unrelated to the UIT cmt triplet head)", low=1),
    )
    batch_fields = ("mlm_ids", "mlm_labels")  # masked ids, labels (original id where masked, 0 elsewhere)
    param_roles = {"cross_attn": "cross", "cross_modal_transformer": "cross", "mlm_head": "classifier"}

    def __init__(self, embed_dim: int, vocab_size: int, depth: int = 4, weight: float = 1.0):
        super().__init__(weight)
        heads = embed_dim // 64 or 1
        self.cross_attn = MultiheadAttention(embed_dim, heads)
        self.cross_modal_transformer = Transformer(embed_dim, depth, heads)
        self.ln_pre_t = LayerNorm(embed_dim)
        self.ln_pre_i = LayerNorm(embed_dim)
        self.ln_post = LayerNorm(embed_dim)
        self.mlm_head = nn.Sequential(OrderedDict([
            ("dense", nn.Linear(embed_dim, embed_dim)),
            ("gelu", QuickGELU()),
            ("ln", LayerNorm(embed_dim)),
            ("fc", nn.Linear(embed_dim, vocab_size)),
        ]))
        scale = embed_dim ** -0.5
        proj_std = scale * (2 * depth) ** -0.5
        fc_std = (2 * embed_dim) ** -0.5
        self.cross_modal_transformer.init_weights(scale, proj_std, fc_std)
        nn.init.normal_(self.cross_attn.in_proj_weight, std=scale)
        nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)
        nn.init.normal_(self.mlm_head.dense.weight, std=fc_std)
        nn.init.normal_(self.mlm_head.fc.weight, std=proj_std)

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(encoder_cfg.embed_dim, encoder_cfg.vocab_size, cfg.cmt_depth, cfg.mlm_loss_weight)

    def cross_former(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Text tokens attend to image tokens (no residual), then self-attention blocks."""
        image = self.ln_pre_i(image_tokens)
        x = self.cross_attn(self.ln_pre_t(text_tokens), image, image)
        return self.ln_post(self.cross_modal_transformer(x))

    def forward(self, batch, out, encoder):
        ids_field, labels_field = self.batch_fields
        masked_ids = batch[ids_field]
        # With IRRA's caption aliasing the first pass already encoded these ids: reuse it.
        same = masked_ids.shape == batch["caption_ids"].shape and torch.equal(masked_ids, batch["caption_ids"])
        text_tokens = out.text.tokens if same else encoder.encode_text(masked_ids)
        x = self.cross_former(text_tokens, out.image.tokens)
        labels = batch[labels_field].reshape(-1)
        labelled = labels != 0
        # The vocabulary classifier runs only at labelled positions: the loss (cross-entropy with
        # ignore_index 0, as IRRA) and the accuracy are the same, at a fraction of the cost.
        logits = self.mlm_head(x.reshape(-1, x.shape[-1])[labelled]).float()
        targets = labels[labelled]
        if not len(targets):  # no caption of the batch has a label: nothing to predict
            return {f"{self.name}_loss": x.sum() * 0.0, f"{self.name}_acc": x.new_zeros(())}
        return {f"{self.name}_loss": self.weight * F.cross_entropy(logits, targets),
                f"{self.name}_acc": accuracy(logits, targets)}
