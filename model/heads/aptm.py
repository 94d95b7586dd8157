"""APTM's text-matching heads on the CLIP dual encoder (Yang et al., ACM MM 2023, Sec. 3.3-3.4;
code Shuyu-XJTU/APTM @ e507117, models/aptm.py and models/model_retrieval.py):

- ``aptm_itc``: image-text contrastive loss with identity-aware soft targets and a learned
  temperature (init 0.07), on the global batch, plus 0.8 x the same on the EDA caption;
- ``itm``: image-text matching on the cross encoder with one hard negative per side, drawn by
  ``torch.multinomial`` from ``softmax(S) + 1e-5`` with same-identity pairs excluded, plus 0.8 x the
  same on the EDA caption; at evaluation it re-ranks each query's cosine top ``rerank_k`` by the raw
  class-1 ITM logit;
- ``aptm_mlm``: masked language modelling of the span-masked caption through the cross encoder.

Differences from upstream, deliberate: the temperature is a log-temperature kept in [0.001, 0.5]
(upstream's is unclamped and weight-decayed); ITM negatives come from the global batch under DDP
(upstream: the GPU's own 120) and their draws from a seeded generator of the head (saved for
resume), so that N processes draw as one; MLM masks only caption tokens (upstream also masks its
[SEP] and padding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from utils.comm import all_gather_no_grad, all_gather_with_grad, get_rank
from utils.settings import Setting

from ..blocks import LayerNorm
from ..objectives import accuracy, identity_labels
from .aptm_fusion import at_eot
from .base import Head, ParamRule
from .contrastive import global_batch, loss_weight
from .registry import register_head

TEMPERATURE_RANGE = (0.001, 0.5)
EDA_FIELD = "eda_caption_ids"


def soft_target_itc(image: torch.Tensor, text: torch.Tensor, pids: torch.Tensor, logit_scale) -> torch.Tensor:
    """APTM's ITC: cross-entropy of ``softmax(scale * cos)`` against the uniform distribution over
    same-identity items, images->texts and texts->images, averaged."""
    logits = logit_scale * F.normalize(image, dim=1) @ F.normalize(text, dim=1).t()
    labels = identity_labels(pids)
    target = labels / labels.sum(dim=1, keepdim=True)
    i2t = -(F.log_softmax(logits, dim=1) * target).sum(dim=1).mean()
    t2i = -(F.log_softmax(logits.t(), dim=1) * target).sum(dim=1).mean()
    return (i2t + t2i) / 2


@torch.no_grad()
def itm_sampling_weights(image: torch.Tensor, text: torch.Tensor, pids: torch.Tensor, logit_scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights of negative texts per image, weights of negative images per text), [B, B] each:
    ``softmax(scale * cos) + 1e-5`` per row (fp32), 0 wherever the identities match."""
    sims = logit_scale * F.normalize(image.float(), dim=1) @ F.normalize(text.float(), dim=1).t()
    same = identity_labels(pids).bool()
    i2t = (F.softmax(sims, dim=1) + 1e-5).masked_fill(same, 0)
    t2i = (F.softmax(sims.t(), dim=1) + 1e-5).masked_fill(same, 0)
    return i2t, t2i


def draw_negatives(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row drawn with probability proportional to its weights; -1 for a row without any
    (every item shares the anchor's identity)."""
    weights = weights.detach().float().cpu()
    valid = weights.sum(dim=1) > 0
    drawn = torch.multinomial(torch.where(valid[:, None], weights, 1.0), 1, generator=generator).squeeze(1)
    return torch.where(valid, drawn, -1)


@register_head
class APTMITCHead(Head):
    name = "aptm_itc"
    method = "APTM"
    summary = "image-text contrastive loss, identity soft targets, learned temperature; + 0.8 x on the EDA caption"
    settings = (
        loss_weight("aptm_itc"),
        Setting("aptm_temp", 0.07, "initial temperature of aptm_itc (learned; also sets itm's sampling)",
                low=TEMPERATURE_RANGE[0], high=TEMPERATURE_RANGE[1]),
        Setting("aptm_eda_weight", 0.8, "weight of the EDA-caption terms of aptm_itc and itm (APTM: 0.8)", low=0.0),
    )
    batch_fields = (EDA_FIELD,)
    text_fields = (EDA_FIELD,)

    def __init__(self, temperature: float = 0.07, eda_weight: float = 0.8, weight: float = 1.0):
        super().__init__(weight)
        self.eda_weight = eda_weight
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(cfg.aptm_temp, cfg.aptm_eda_weight, cfg.aptm_itc_loss_weight)

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def param_rule(self, param_name, param):
        """New module: lr x lr_factor, no weight decay (decay would pull the log-temperature to 0,
        the temperature to 1)."""
        return ParamRule("classifier", weight_decay=0.0)

    def forward(self, batch, out, encoder):
        with torch.no_grad():  # kept in range as ALBEF does, before the step uses it
            self.log_temperature.clamp_(*map(math.log, TEMPERATURE_RANGE))
        scale = 1 / self.temperature()
        image, text, pids = global_batch(batch, out)
        loss = soft_target_itc(image, text, pids, scale)
        if self.eda_weight:
            eda = all_gather_with_grad(out.texts[EDA_FIELD].global_feature)
            loss = loss + self.eda_weight * soft_target_itc(image, eda, pids, scale)
        return {"aptm_itc_loss": self.weight * loss, "aptm_temp": self.temperature().detach()}


class ITMClassifier(nn.Sequential):
    """APTM's ITM head (``build_mlp``): Linear(W, 2W), LayerNorm, GELU, Linear(2W, 2); class 1 = match."""

    def __init__(self, width: int):
        super().__init__(nn.Linear(width, 2 * width), LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, 2))


@register_head
class ITMHead(Head):
    name = "itm"
    method = "APTM"
    summary = ("image-text matching on the cross encoder, one sampled hard negative per side; + 0.8 x on the "
               "EDA caption; re-ranks the cosine top `rerank_k` by the ITM logit")
    settings = (
        loss_weight("itm"),
        Setting("rerank_mode", "aptm", "itm re-ranking: aptm (min-max normalised ITM logit + w x normalised "
                "cosine over the whole evaluation, w = rerank_cos_weight) or linear (ITM logit + w x cosine)",
                choices=("aptm", "linear")),
        Setting("rerank_cos_weight", 0.002, "w of rerank_mode (APTM: 0.002; linear: about 8 / cosine range "
                "imitates APTM's 4-GPU evaluation)", low=0.0),
    )
    requires = ("aptm_fusion",)
    batch_fields = (EDA_FIELD,)
    text_fields = (EDA_FIELD,)

    def __init__(self, width: int, rerank_k: int = 128, fixed_temperature: float = 0.02, eda_weight: float = 0.8,
                 rerank_mode: str = "aptm", cos_weight: float = 0.002, seed: int = 0, weight: float = 1.0):
        super().__init__(weight)
        self.classifier = ITMClassifier(width)
        self.rerank_k, self.rerank_mode, self.cos_weight = rerank_k, rerank_mode, cos_weight
        self.fixed_temperature, self.eda_weight = fixed_temperature, eda_weight
        self.generator = torch.Generator().manual_seed(seed)  # negatives: the same draws on every process
        self.peers: dict = {}

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(encoder_cfg.text_width, cfg.rerank_k, cfg.temperature, cfg.aptm_eda_weight, cfg.rerank_mode,
                   cfg.rerank_cos_weight, cfg.seed, cfg.itm_loss_weight)

    def bind(self, heads, encoder):
        self.peers = {"fusion": heads["aptm_fusion"], "itc": heads.get("aptm_itc")}

    def param_rule(self, param_name, param):
        return ParamRule("classifier", weight_decay=0.0 if param.ndim == 1 else None)

    def logit_scale(self) -> float:
        """aptm_itc's learned temperature sets the sampling when it is on, else ``temperature``."""
        itc = self.peers.get("itc")
        return 1 / (float(itc.temperature().detach()) if itc is not None else self.fixed_temperature)

    def match_logits(self, stream: torch.Tensor, ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """ITM logits [N, 2] of N (caption, image) pairs: the fused EOT token through the classifier."""
        fusion = self.peers["fusion"]
        return self.classifier(at_eot(fusion.fuse(stream, ids, memory), ids))

    def matching_loss(self, stream, ids, text_global, memory, image_global, pids) -> tuple[torch.Tensor, ...]:
        """Cross-entropy over this process's positives and their two negatives (a text's sampled
        image, an image's sampled text, each text with its own ids), negatives from the global batch."""
        g_stream, g_memory = all_gather_with_grad(stream), all_gather_with_grad(memory)
        g_ids, g_pids = all_gather_no_grad(ids), all_gather_no_grad(pids)
        i2t, t2i = itm_sampling_weights(all_gather_no_grad(image_global.detach()),
                                        all_gather_no_grad(text_global.detach()), g_pids, self.logit_scale())
        neg_image, neg_text = draw_negatives(t2i, self.generator), draw_negatives(i2t, self.generator)
        local = torch.arange(len(ids)) + get_rank() * len(ids)
        neg_image, neg_text = neg_image[local].to(ids.device), neg_text[local].to(ids.device)
        has_image, has_text = neg_image >= 0, neg_text >= 0
        streams = torch.cat([stream, stream[has_image], g_stream[neg_text[has_text]]])
        pair_ids = torch.cat([ids, ids[has_image], g_ids[neg_text[has_text]]])
        memories = torch.cat([memory, g_memory[neg_image[has_image]], memory[has_text]])
        logits = self.match_logits(streams, pair_ids, memories).float()
        labels = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        labels[:len(ids)] = 1
        missing = (~has_image).sum() + (~has_text).sum()
        return F.cross_entropy(logits, labels), accuracy(logits, labels), missing

    def forward(self, batch, out, encoder):
        fusion, pids = self.peers["fusion"], batch["pids"]
        texts = [(out.text, 1.0)] + ([(out.texts[EDA_FIELD], self.eda_weight)] if self.eda_weight else [])
        total, outputs = 0.0, {}
        for (text, weight), key in zip(texts, ("itm", "itm_eda")):
            loss, acc, missing = self.matching_loss(fusion.text_stream(text), text.ids, text.global_feature,
                                                    out.image.hidden, out.image.global_feature, pids)
            total = total + weight * loss
            outputs[f"{key}_acc"] = acc
            outputs[f"{key}_missing_negatives"] = missing.float()
        return {"itm_loss": self.weight * total, **outputs}

    # ---------------------------------------------------------------- re-ranking
    def rerank_query_cache(self, text):
        return {"stream": self.peers["fusion"].text_stream(text), "ids": text.ids}

    def rerank_gallery_cache(self, image):
        return {"memory": image.hidden}

    def rerank_score(self, query, gallery):
        """The raw class-1 ITM logit of each pair (APTM: not a probability, not l1 - l0)."""
        stream, memory = query["stream"].float(), gallery["memory"].float()
        return self.match_logits(stream, query["ids"], memory)[:, 1].float()

    def rerank_combine(self, second, first, stats):
        """aptm: (ITM - min) / (max - min) + w (cos - min) / (max - min), ranges over the whole
        evaluation (APTM's single-process formula); linear: ITM + w cos."""
        if self.rerank_mode == "linear":
            return second + self.cos_weight * first
        itm = (second - stats.second_min) / max(stats.second_max - stats.second_min, 1e-12)
        cos = (first - stats.first_min) / max(stats.first_max - stats.first_min, 1e-12)
        return itm + self.cos_weight * cos

    def training_state(self):
        return {"generator": self.generator.get_state()}

    def load_training_state(self, state):
        self.generator.set_state(state["generator"])


@register_head
class APTMMLMHead(Head):
    name = "aptm_mlm"
    method = "APTM"
    summary = "masked language modelling of the span-masked caption through the cross encoder"
    settings = (
        loss_weight("aptm_mlm"),
        Setting("tie_mlm_decoder", False, "aptm_mlm predicts with CLIP's token embedding matrix (APTM ties "
                "BERT's; off: MLM gradients leave the input embeddings alone)"),
    )
    requires = ("aptm_fusion",)
    batch_fields = ("aptm_mlm_ids", "aptm_mlm_labels")
    text_fields = ("aptm_mlm_ids",)

    def __init__(self, width: int, vocab_size: int, tie: bool = False, weight: float = 1.0):
        super().__init__(weight)
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), LayerNorm(width))
        self.tie = tie
        self.decoder = None if tie else nn.Linear(width, vocab_size)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size)) if tie else None
        self.peers: dict = {}

    @classmethod
    def from_config(cls, cfg, encoder_cfg, num_classes):
        return cls(encoder_cfg.text_width, encoder_cfg.vocab_size, cfg.tie_mlm_decoder, cfg.aptm_mlm_loss_weight)

    def bind(self, heads, encoder):
        self.peers = {"fusion": heads["aptm_fusion"]}

    def param_rule(self, param_name, param):
        return ParamRule("classifier", weight_decay=0.0 if param.ndim == 1 else None)

    def forward(self, batch, out, encoder):
        fusion = self.peers["fusion"]
        stream = fusion.text_stream(out.texts["aptm_mlm_ids"])
        # the padding mask comes from the unmasked caption (masking never touches EOT or padding)
        fused = fusion.fuse(stream, batch["caption_ids"], out.image.hidden)
        labels = batch["aptm_mlm_labels"][:, :fused.shape[1]]  # nothing is masked after EOT
        masked = labels != -100
        hidden = self.transform(fused[masked])
        if self.tie:
            logits = F.linear(hidden, encoder.token_embedding.weight, self.decoder_bias)
        else:
            logits = self.decoder(hidden)
        logits, targets = logits.float(), labels[masked]
        return {"aptm_mlm_loss": self.weight * F.cross_entropy(logits, targets),
                "aptm_mlm_acc": accuracy(logits, targets)}
