"""Loss functions on global features, pure and shared by the heads (IRRA's definitions).

Features are un-normalised [B, E] tensors; each loss normalises where its definition says so.
Similarity rows are texts, columns images, unless stated otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SDM_EPS = 1e-8


def identity_labels(pids: torch.Tensor) -> torch.Tensor:
    """y[i, j] = 1 if sample i and sample j share an identity (float)."""
    return (pids.view(-1, 1) == pids.view(1, -1)).float()


def _kl_to_target(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """mean_i sum_j p_ij (log p_ij - log(q_ij + eps)), p = row softmax of logits."""
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(target + eps))).sum(dim=1).mean()


def sdm_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor,
             logit_scale: float, eps: float = SDM_EPS) -> torch.Tensor:
    """Similarity Distribution Matching: KL(softmax(s*cos) || q) text->image plus image->text.

    q is the row-normalised same-identity matrix (IRRA divides by column sums, which is the
    same because the matrix is symmetric).
    """
    image_norm = F.normalize(image_feats, dim=1)
    text_norm = F.normalize(text_feats, dim=1)
    labels = identity_labels(pids)
    target = labels / labels.sum(dim=1, keepdim=True)
    t2i = logit_scale * text_norm @ image_norm.t()
    return _kl_to_target(t2i, target, eps) + _kl_to_target(t2i.t(), target, eps)


def itc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """InfoNCE with diagonal targets (same-identity pairs off the diagonal count as negatives)."""
    logits = logit_scale * F.normalize(image_feats, dim=1) @ F.normalize(text_feats, dim=1).t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def cmpm_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor,
              eps: float = SDM_EPS) -> torch.Tensor:
    """Cross-Modal Projection Matching: un-normalised features projected on the other side's
    unit vectors, matched to labels divided by their row's L2 norm (IRRA's definition)."""
    labels = identity_labels(pids)
    target = labels / labels.norm(dim=1, keepdim=True)
    image_on_text = image_feats @ F.normalize(text_feats, dim=1).t()
    text_on_image = text_feats @ F.normalize(image_feats, dim=1).t()
    return _kl_to_target(image_on_text, target, eps) + _kl_to_target(text_on_image, target, eps)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == labels).float().mean()


def cmt_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor,
             margin: float = 0.05) -> torch.Tensor:
    """Cross-modal triplet (UIT/SEN): for each text the most similar image of another identity, and
    for each image the most similar text of another identity, against the paired item at the same
    index; hinge on cosine similarity with a hard margin, the two directions' means summed.

    Mining uses a detached copy; the loss gathers the mined negatives from the live features so
    they get gradients. Anchors with no other-identity sample are left out of their direction's
    mean (0 when there are none).
    """
    sims = F.normalize(text_feats, dim=1) @ F.normalize(image_feats, dim=1).t()  # texts x images
    negatives_allowed = identity_labels(pids) == 0
    mining = sims.detach().masked_fill(~negatives_allowed, float("-inf"))
    positive = sims.diagonal()
    total = sims.new_zeros(())
    for scores, mined, valid in ((sims, mining.argmax(dim=1), negatives_allowed.any(dim=1)),
                                 (sims.t(), mining.argmax(dim=0), negatives_allowed.any(dim=0))):
        hardest = scores.gather(1, mined[:, None]).squeeze(1)
        hinge = (hardest - positive + margin).clamp(min=0)[valid]
        if len(hinge):
            total = total + hinge.mean()
    return total


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's reconstruction loss: per patch the mean squared error over its values, averaged over
    the patches with ``mask`` 1 ([B, N] 0/1); patches with mask 0 contribute nothing."""
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()
