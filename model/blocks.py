"""Transformer building blocks shared by the CLIP encoders and the heads (batch-first layout).

Parameter names follow OpenAI CLIP (``attn.in_proj_weight``, ``mlp.c_fc``...), so checkpoints
load without renaming. Attention goes through ``F.scaled_dot_product_attention``, which equals
the plain softmax(QK^T/sqrt(d))V formula in fp32 and uses fused kernels where available.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (as CLIP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout, batch-first.

    With ``kv_width`` (keys and values of another width, e.g. image tokens for text queries) the
    projections are separate, as ``nn.MultiheadAttention(kdim=vdim=kv_width)`` keeps them:
    ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``."""

    def __init__(self, width: int, heads: int, kv_width: int | None = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        if kv_width is None or kv_width == width:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            self.in_proj_weight = None
            self.q_proj_weight = nn.Parameter(torch.empty(width, width))
            self.k_proj_weight = nn.Parameter(torch.empty(width, kv_width))
            self.v_proj_weight = nn.Parameter(torch.empty(width, kv_width))
            for weight in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(weight)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.zeros_(self.out_proj.bias)
        self.dropout = 0.0  # on the attention probabilities, in training mode (nn.MultiheadAttention's)

    def projection_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The query, key and value projection weights."""
        if self.in_proj_weight is not None:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                causal: bool = False, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``key_mask`` ([B, Lk] bool, True = attend) leaves out keys such as text padding."""
        w_q, w_k, w_v = self.projection_weights()
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = (self._split(F.linear(x, w, b))
                   for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + MHA(LN(x)), then x + MLP(LN(x)), MLP with QuickGELU (OpenAI CLIP) or the
    exact GELU (open_clip's and Hugging Face's non-OpenAI weights)."""

    def __init__(self, width: int, heads: int, quick_gelu: bool = True):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, causal=causal)
        return x + self.mlp(self.ln_2(x))

    @torch.no_grad()
    def attention_row(self, x: torch.Tensor, rows: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """The block's attention probabilities for one query position per sample (``rows`` [B]) over
        all keys, averaged over the heads: [B, L] (``nn.MultiheadAttention``'s need_weights output,
        that row). Computed from the block input as the block computes it; no gradient."""
        h = self.ln_1(x)
        (w_q, w_k, _), (b_q, b_k, _) = self.attn.projection_weights(), self.attn.in_proj_bias.chunk(3)
        batch, length, _ = h.shape
        query = F.linear(h[torch.arange(batch, device=h.device), rows], w_q, b_q).view(batch, self.attn.heads, -1)
        keys = self.attn._split(F.linear(h, w_k, b_k))  # [B, H, L, d]
        logits = torch.einsum("bhd,bhld->bhl", query, keys) * query.shape[-1] ** -0.5
        if causal:
            later = torch.arange(length, device=h.device)[None, :] > rows[:, None]
            logits = logits.masked_fill(later[:, None, :], float("-inf"))
        return logits.float().softmax(dim=-1).mean(dim=1)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool = True):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers))
        self.grad_checkpointing = False  # recompute each block's activations in the backward pass

    def forward(self, x: torch.Tensor, causal: bool = False, blocks: int | None = None) -> torch.Tensor:
        """All blocks, or only the first ``blocks``."""
        for block in self.resblocks[:blocks]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x

    def forward_with_attention(self, x: torch.Tensor, rows: torch.Tensor, causal: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` and the last block's head-averaged attention row of query ``rows`` [B]."""
        x = self(x, causal, blocks=self.layers - 1)
        last = self.resblocks[-1]
        return last(x, causal=causal), last.attention_row(x, rows, causal)

    def init_weights(self, attn_std: float, proj_std: float, fc_std: float) -> None:
        """CLIP's initialisation of the blocks (also IRRA's for its cross-modal transformer)."""
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
