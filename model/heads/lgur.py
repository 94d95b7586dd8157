"""LGUR (Shao et al., "Learning Granularity-Unified Representations for Text-to-Image Person
Re-identification", ACM MM 2022, Sec. 3; code ZhiyinShao-H/LGUR @ c203cc7) as a head on the CLIP
dual encoder.

DGA: a shared dictionary D (400 atoms) reconstructs the text tokens (T_re) and the visual tokens
(V_re, gated by a per-token foreground mask M); in training the visual tokens are also rebuilt from
their own caption's tokens (V_g, text-guided). PGU: 6 shared prototypes pool each stream into 6
parts, each projected to 512-d. Losses: per-prototype ID on (V_g, T) and (V_re, T_re), and the
semi-hard, randomly sampled ranking loss on (V_g, T), (V_re, T_re), (T, T_re) and (V_g, V_re).
Retrieval uses the unified reconstructed features (T_re and V_re parts, concatenated), as LGUR's
test code.

Every attention is LGUR's "XDec" layer (vit_pytorch.py Transformer_mydecoder): cross-attention
only, one LayerNorm shared by queries and memory, bias-free q/kv, scale 1/sqrt(head width), then a
ReLU FFN; pre-norm residuals, no self-attention, no positional encoding.

Port: V = CLIP's patch tokens after ``proj`` (CLS dropped), T = the caption's tokens after
``text_projection``, both ``embed_dim`` wide like D and P (512 for ViT-B/16). Valid text keys are
SOT+1 .. EOT, from the EOT index (LGUR uses ``ids != 0``; CLIP's id 0 is "!"), so the constant SOT
output is never a key. Differences from LGUR: ranking negatives are drawn by a seeded generator of
the head (saved for resume; LGUR: unseeded numpy) from the global batch under DDP; an anchor
without any negative adds 0 (LGUR crashes); ``lgur_rank_mode: symmetric`` fixes LGUR's second
direction, which picks the negative from S^T but takes the hinge on S (``upstream``, the default,
keeps it); the summed ranking terms are weighted by ``lgur_rank_weight`` (0.1: at batch 128 they
start near 340, against 37 for the ID terms; 1 is LGUR's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from utils.comm import all_gather_no_grad, all_gather_with_grad
from utils.errors import ConfigError
from utils.settings import Setting

from ..objectives import accuracy
from .base import GLOBAL, Head, ParamRule
from .contrastive import loss_weight
from .registry import register_head


class XDecLayer(nn.Module):
    """x + Attn(LN x, LN m) [keys masked by ``key_mask``], then x + FFN(LN x) (LGUR's decoder layer)."""

    def __init__(self, width: int, heads: int, head_width: int, ffn_width: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)  # one module for the queries and the memory
        self.to_q = nn.Linear(width, heads * head_width, bias=False)
        self.to_kv = nn.Linear(width, 2 * heads * head_width, bias=False)
        self.to_out = nn.Linear(heads * head_width, width)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_width), nn.ReLU(), nn.Linear(ffn_width, width))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self._split(self.to_q(self.norm(x)))
        k, v = (self._split(t) for t in self.to_kv(self.norm(memory)).chunk(2, dim=-1))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.to_out(attended.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        return x + self.ffn(self.ffn_norm(x))


class XDecoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, head_width: int, ffn_width: int):
        super().__init__()
        self.layers = nn.ModuleList(XDecLayer(width, heads, head_width, ffn_width) for _ in range(layers))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, memory, key_mask)
        return x


def concat_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, B'] cosine of the part features [K, B, D] and [K, B', D], each concatenated over K first."""
    a, b = (F.normalize(x.permute(1, 0, 2).flatten(1), dim=1) for x in (a, b))
    return a @ b.t()


def semi_hard_ranking(sims: torch.Tensor, pids: torch.Tensor, margin: float, generator: torch.Generator,
                      symmetric: bool = False) -> torch.Tensor:
    """LGUR's ranking loss (loss/RankingLoss.py): for every anchor, rows of ``sims`` then rows of its
    transpose, one negative (another identity) drawn uniformly among those with
    0 < S[i, j] - S[i, i] + margin < margin, hinge ``relu(margin - S[i, i] + S[i, j])``, summed. LGUR's
    second direction picks j from S^T but takes the hinge on S (``symmetric`` False, as LGUR) rather
    than on S^T. A direction without any triplet adds its last anchor with its first negative, as
    LGUR; an anchor without a negative adds 0 (LGUR crashes)."""
    total = sims.new_zeros(())
    negatives = pids[:, None] != pids[None, :]
    for scores, hinge_on in ((sims, sims), (sims.t(), sims.t() if symmetric else sims)):
        detached = scores.detach()
        gap = detached - detached.diagonal()[:, None] + margin
        candidates = negatives & (gap > 0) & (gap < margin)
        draws = torch.rand(scores.shape, generator=generator).to(scores.device).masked_fill(~candidates, -1)
        anchors = candidates.any(dim=1).nonzero().squeeze(1)
        chosen = draws.argmax(dim=1)[anchors]
        if not len(anchors):  # LGUR's fallback: the last anchor and its first negative (by index)
            last = len(scores) - 1
            if not negatives[last].any():
                continue
            anchors, chosen = torch.tensor([last], device=scores.device), negatives[last].float().argmax()[None]
        total = total + F.relu(margin - hinge_on[anchors, anchors] + hinge_on[anchors, chosen]).sum()
    return total


@register_head
class LGURHead(Head):
    name = "lgur"
    method = "LGUR"
    summary = ("granularity-unified features: a shared dictionary rebuilds text and image tokens, shared "
               "prototypes pool them into 6 parts; ID + semi-hard ranking; retrieval with its own features")
    settings = (
        loss_weight("lgur"),
        Setting("lgur_rank_weight", 0.1, "weight of lgur's four summed ranking terms (LGUR: 1; 0.1 keeps them "
                "on the scale of its ID terms at batch 128)", low=0.0),
        Setting("lgur_rank_mode", "upstream", "upstream: LGUR's second direction (negative from S^T, hinge on "
                "S); symmetric: both directions on their own matrix", choices=("upstream", "symmetric")),
        Setting("lgur_margin", 0.3, "margin of lgur's ranking loss (LGUR's training script: 0.3)", low=0.0),
        Setting("lgur_dict_size", 400, "atoms of lgur's shared dictionary", low=1),
        Setting("lgur_prototypes", 6, "lgur's shared prototypes (parts)", low=1),
        Setting("lgur_part_dim", 512, "width of each lgur part feature", low=1),
        Setting("lgur_lr", 1e-4, "lr of lgur's decoders, dictionary, prototypes and mask (LGUR: 1e-4)", low=0.0),
        Setting("lgur_proj_lr", 1e-3, "lr of lgur's part projections and classifiers (LGUR: 1e-3)", low=0.0),
        Setting("lgur_eps", 1e-8, "Adam eps of lgur's parameters (LGUR: 1e-8)", low=0.0),
        Setting("lgur_global_weight", 0.0, "weight of the CLIP global cosine beside lgur's features in "
                "retrieval (LGUR: 0, its features alone)", low=0.0),
    )

    def __init__(self, width: int, num_classes: int, dict_size: int = 400, prototypes: int = 6,
                 part_dim: int = 512, margin: float = 0.3, rank_mode: str = "upstream", rank_weight: float = 0.1,
                 lr: float = 1e-4, proj_lr: float = 1e-3, eps: float = 1e-8, global_weight: float = 0.0,
                 seed: int = 0, weight: float = 1.0):
        super().__init__(weight)
        self.margin, self.symmetric, self.rank_weight = margin, rank_mode == "symmetric", rank_weight
        self.lr, self.proj_lr, self.eps, self.global_weight = lr, proj_lr, eps, global_weight
        self.dictionary = nn.Parameter(torch.randn(dict_size, width))
        self.prototypes = nn.Parameter(torch.randn(prototypes, width))
        self.mask = nn.Sequential(nn.Linear(width, 1), nn.Sigmoid())
        self.dga = XDecoder(width, layers=1, heads=6, head_width=64, ffn_width=768)
        self.pgu = XDecoder(width, layers=2, heads=6, head_width=512, ffn_width=512)
        self.projections = nn.ModuleList(nn.Linear(width, part_dim, bias=False) for _ in range(prototypes))
        self.classifiers = nn.ModuleList(nn.Linear(part_dim, num_classes) for _ in range(prototypes))
        for projection in self.projections:  # LGUR's 1x1 conv init
            nn.init.kaiming_normal_(projection.weight, mode="fan_out", nonlinearity="relu")
        for classifier in self.classifiers:
            nn.init.normal_(classifier.weight, std=0.001)
            nn.init.zeros_(classifier.bias)
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        if cfg.global_sees_masked_caption:
            raise ConfigError("lgur reads the clean caption: turn global_sees_masked_caption off (IRRA's aliasing "
                              "would need a second text pass)")
        # V (image tokens after proj), T (text tokens after text_projection), D and P share one width
        widths = {"image tokens": encoder_cfg.embed_dim, "text tokens": encoder_cfg.embed_dim}
        if len(set(widths.values())) != 1:
            raise ConfigError(f"lgur needs one width for V, T and its dictionary, got {widths}")
        return cls(encoder_cfg.embed_dim, num_classes, cfg.lgur_dict_size, cfg.lgur_prototypes, cfg.lgur_part_dim,
                   cfg.lgur_margin, cfg.lgur_rank_mode, cfg.lgur_rank_weight, cfg.lgur_lr, cfg.lgur_proj_lr,
                   cfg.lgur_eps, cfg.lgur_global_weight, cfg.seed, cfg.lgur_loss_weight)

    def param_rule(self, param_name, param):
        """LGUR's optimiser: its own lr per role, Adam eps 1e-8, no weight decay."""
        lr = self.proj_lr if param_name.startswith(("projections", "classifiers")) else self.lr
        return ParamRule(lr=lr, weight_decay=0.0, eps=self.eps)

    # ---------------------------------------------------------------- streams
    @staticmethod
    def text_stream(tokens: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The caption tokens after SOT up to the longest EOT, and their validity (SOT+1 .. EOT)."""
        eot = ids.argmax(dim=1, keepdim=True)
        length = int(eot.max()) + 1
        positions = torch.arange(1, length, device=ids.device)
        return tokens[:, 1:length].float(), positions <= eot

    def reconstruct(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """DGA: ``x`` rebuilt from the dictionary (or from ``memory``), [B, N, D]."""
        if memory is None:
            memory = self.dictionary.expand(len(x), -1, -1)
        return self.dga(x, memory, key_mask)

    def unify(self, stream: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """PGU: the prototypes pool ``stream`` into parts, each through its projection: [K, B, part_dim]."""
        pooled = self.pgu(self.prototypes.expand(len(stream), -1, -1), stream, key_mask)
        return torch.stack([projection(pooled[:, k]) for k, projection in enumerate(self.projections)])

    def image_features(self, patches: torch.Tensor) -> torch.Tensor:
        """Retrieval features of images from their patch tokens: the unified V_re parts, concatenated."""
        patches = patches.float()
        parts = self.unify(self.reconstruct(patches) * self.mask(patches))
        return parts.permute(1, 0, 2).flatten(1)

    def text_features(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Retrieval features of captions: the unified T_re parts, concatenated."""
        text, keep = self.text_stream(tokens, ids)
        return self.unify(self.reconstruct(text), keep).permute(1, 0, 2).flatten(1)

    # ---------------------------------------------------------------- training
    def id_loss(self, image: torch.Tensor, text: torch.Tensor, pids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(1/K) sum_k [CE(cls_k(image_k)) + CE(cls_k(text_k))], and both accuracies (LGUR's Id_Loss)."""
        loss, image_acc, text_acc = 0.0, 0.0, 0.0
        for classifier, image_part, text_part in zip(self.classifiers, image, text):
            image_logits, text_logits = classifier(image_part), classifier(text_part)
            loss = loss + F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)
            image_acc, text_acc = image_acc + accuracy(image_logits, pids), text_acc + accuracy(text_logits, pids)
        k = len(self.classifiers)
        return loss / k, image_acc / k, text_acc / k

    def ranking(self, a: torch.Tensor, b: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        """The ranking loss on the global batch (parts gathered from every process)."""
        a, b = (all_gather_with_grad(x.transpose(0, 1)).transpose(0, 1) for x in (a, b))
        return semi_hard_ranking(concat_cosine(a, b), all_gather_no_grad(pids), self.margin, self.generator,
                                 self.symmetric)

    def forward(self, batch, out, encoder):
        pids = batch["pids"]
        patches = out.image.tokens[:, 1:].float()  # CLS dropped, as LGUR's backbone drops its CLS
        text, keep = self.text_stream(out.text.tokens, out.text.ids)
        gate = self.mask(patches)
        guided = self.reconstruct(patches, text, keep) * gate  # V_g: training only (needs the caption)
        image_re = self.reconstruct(patches) * gate
        text_re = self.reconstruct(text)
        v_g, v_re = self.unify(guided), self.unify(image_re)
        t, t_re = self.unify(text, keep), self.unify(text_re, keep)
        id_raw, image_acc, text_acc = self.id_loss(v_g, t, pids)
        id_dict, _, _ = self.id_loss(v_re, t_re, pids)
        ranks = {"rank": self.ranking(v_g, t, pids), "rank_dict": self.ranking(v_re, t_re, pids),
                 "rank_text": self.ranking(t, t_re, pids), "rank_image": self.ranking(v_g, v_re, pids)}
        total = id_raw + id_dict + self.rank_weight * sum(ranks.values())
        return {"lgur_loss": self.weight * total, "lgur_id": id_raw.detach(), "lgur_id_dict": id_dict.detach(),
                **{f"lgur_{k}": v.detach() for k, v in ranks.items()},
                "lgur_img_acc": image_acc, "lgur_txt_acc": text_acc, "lgur_mask_mean": gate.mean().detach()}

    def training_state(self):
        return {"generator": self.generator.get_state()}

    def load_training_state(self, state):
        self.generator.set_state(state["generator"])

    # ---------------------------------------------------------------- retrieval
    def retrieval_weights(self):
        return {GLOBAL: self.global_weight, "lgur": 1.0}

    def query_features(self, text):
        return {"lgur": self.text_features(text.tokens, text.ids)}

    def gallery_features(self, image):
        return {"lgur": self.image_features(image.tokens[:, 1:])}

