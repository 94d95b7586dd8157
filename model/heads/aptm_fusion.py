"""APTM's cross encoder on the CLIP dual encoder (Yang et al., "Towards Unified Text-based Person
Retrieval", ACM MM 2023, Sec. 3; code Shuyu-XJTU/APTM @ e507117, models/bert.py fusion layers 6-11).

Upstream fuses with BERT layers 6-11: self-attention over the text stream, cross-attention to every
image token, FFN, post-LN. Here (``aptm_fusion_init: random``, the default) 6 pre-LN layers of the
CLIP/IRRA style run over CLIP's text tokens after ``ln_final`` (the text width) with bidirectional
self-attention (padding after EOT masked as keys), cross-attention to all image tokens before the
projection (vision width, CLS included; one shared LayerNorm) and an MLP; ``ln_out`` closes.
``clip_text_upper`` mirrors APTM's BERT split instead: the stream is CLIP's text after its first
half of blocks, and the layers start as copies of the upper half (causal mask removed) with new
cross-attention. The ITM readout is the fused token at EOT (CLIP's sentence token; APTM's [CLS]).

The module is shared by the ``itm`` and ``aptm_mlm`` heads, which require this head.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from utils.errors import ConfigError
from utils.settings import PROBABILITY, Setting

from ..blocks import LayerNorm, MultiheadAttention, QuickGELU, ResidualAttentionBlock
from ..clip import CLIPEncoder, TextOutput
from .base import Head, ParamRule
from .registry import register_head


def text_keep(ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: True from SOT to EOT inclusive (EOT, the largest id, found by argmax), False after."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    return positions <= ids.argmax(dim=1, keepdim=True)


def at_eot(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The token at each caption's EOT: [B, L, D] -> [B, D]."""
    return tokens[torch.arange(len(ids), device=ids.device), ids.argmax(dim=1)]


class FusionLayer(nn.Module):
    """Pre-LN: x + SelfAttn(LN x) over valid text keys, x + CrossAttn(LN x, memory), x + MLP(LN x)."""

    def __init__(self, width: int, memory_width: int, dropout: float = 0.1):
        super().__init__()
        heads = width // 64 or 1
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.cross_attn = MultiheadAttention(width, heads, kv_width=memory_width)
        self.ln_3 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.dropout(self.attn(h, h, h, key_mask=keep))
        x = x + self.dropout(self.cross_attn(self.ln_2(x), memory, memory))
        return x + self.dropout(self.mlp(self.ln_3(x)))

    def load_text_block(self, block: ResidualAttentionBlock) -> None:
        """Self-attention, MLP and their LayerNorms copied from a CLIP text block."""
        for mine, theirs in ((self.ln_1, block.ln_1), (self.attn, block.attn), (self.ln_3, block.ln_2),
                             (self.mlp, block.mlp)):
            mine.load_state_dict(theirs.state_dict())


class APTMFusion(nn.Module):
    """Text tokens [N, L, W] attend to each other and to image tokens [N, M, Wm] -> [N, L, W]."""

    def __init__(self, width: int, memory_width: int, layers: int = 6, dropout: float = 0.1):
        super().__init__()
        self.ln_memory = LayerNorm(memory_width)
        self.layers = nn.ModuleList(FusionLayer(width, memory_width, dropout) for _ in range(layers))
        self.ln_out = LayerNorm(width)
        attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for layer in self.layers:  # CLIP's initialisation, as IRRA's cross-modal transformer
            nn.init.normal_(layer.attn.in_proj_weight, std=attn_std)
            for weight in layer.cross_attn.projection_weights():
                nn.init.normal_(weight, std=attn_std)
            for weight in (layer.attn.out_proj.weight, layer.cross_attn.out_proj.weight, layer.mlp.c_proj.weight):
                nn.init.normal_(weight, std=proj_std)
            nn.init.normal_(layer.mlp.c_fc.weight, std=fc_std)

    def forward(self, text: torch.Tensor, keep: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        memory = self.ln_memory(memory)
        for layer in self.layers:
            text = layer(text, keep, memory)
        return self.ln_out(text)


@register_head
class APTMFusionHead(Head):
    """The cross encoder itself (no loss): required by ``itm`` and ``aptm_mlm``."""
    name = "aptm_fusion"
    method = "APTM"
    summary = "cross encoder shared by `itm` and `aptm_mlm`: text tokens fused with all image tokens"
    settings = (
        Setting("aptm_fusion_layers", 6, "layers of the APTM cross encoder (random init; APTM: 6)", low=1),
        Setting("aptm_fusion_dropout", 0.1, "dropout in the APTM cross encoder (APTM's BERT: 0.1)", **PROBABILITY),
        Setting("aptm_fusion_init", "random", "random: new layers over CLIP's text output; clip_text_upper: "
                "continue CLIP's text after half its blocks, layers copied from the upper half",
                choices=("random", "clip_text_upper")),
    )

    def __init__(self, width: int, memory_width: int, layers: int = 6, dropout: float = 0.1,
                 split: int | None = None):
        super().__init__()
        self.split = split  # clip_text_upper: the stream leaves the text tower after this many blocks
        self.fusion = APTMFusion(width, memory_width, layers, dropout)
        self.peers: dict[str, CLIPEncoder] = {}

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        if cfg.aptm_fusion_init == "random":
            return cls(encoder_cfg.text_width, encoder_cfg.vision_width, cfg.aptm_fusion_layers, cfg.aptm_fusion_dropout)
        split = encoder_cfg.text_layers // 2
        if encoder_cfg.text_layers - split < 1:
            raise ConfigError(f"aptm_fusion_init clip_text_upper needs at least 2 text blocks, the encoder has "
                              f"{encoder_cfg.text_layers}")
        return cls(encoder_cfg.text_width, encoder_cfg.vision_width, encoder_cfg.text_layers - split,
                   cfg.aptm_fusion_dropout, split)

    def bind(self, heads, encoder):
        self.peers = {"encoder": encoder}
        if self.split is not None:  # copies (not shared weights) of CLIP's upper text blocks
            for layer, block in zip(self.fusion.layers, encoder.transformer.resblocks[self.split:]):
                layer.load_text_block(block)
            self.fusion.ln_out.load_state_dict(encoder.ln_final.state_dict())

    def forward(self, batch, out, encoder):
        return {}

    def param_rule(self, param_name, param):
        """New module: lr x lr_factor (biases too); no weight decay on LayerNorm weights or biases."""
        return ParamRule("classifier", weight_decay=0.0 if param.ndim == 1 else None)

    def text_stream(self, text: TextOutput) -> torch.Tensor:
        """What the cross encoder reads of a caption pass: the tokens after ``ln_final`` (random init),
        or the stream after the first half of the text blocks (clip_text_upper, one partial pass)."""
        if self.split is None:
            return text.hidden
        return self.peers["encoder"].text_states(text.ids, self.split)

    def fuse(self, stream: torch.Tensor, ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Fused text tokens [N, L', W] up to the longest caption's EOT (L' <= L): padding after EOT is
        never attended, so the tokens up to each EOT are those of the full-length pass, at less cost.
        ``ids`` (unmasked) give each EOT."""
        length = int(ids.argmax(dim=1).max()) + 1
        return self.fusion(stream[:, :length], text_keep(ids[:, :length]), memory)
