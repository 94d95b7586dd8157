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


# ---------------------------------------------------------------- TBPS-CLIP (Cao et al., AAAI 2024)
# Features below are L2-normalised already; rows and columns both span the global batch, so each
# value equals TBPS-CLIP's per-rank value (local rows, gathered columns) averaged over its ranks.
def identity_targets(pids: torch.Tensor) -> torch.Tensor:
    """Q: same-identity indicators, each row divided by its sum (float32, as TBPS-CLIP builds it)."""
    labels = identity_labels(pids)
    return labels / labels.sum(dim=1, keepdim=True)


def soft_label_itc(image: torch.Tensor, text: torch.Tensor, image_soft: torch.Tensor, text_soft: torch.Tensor,
                   targets: torch.Tensor, alpha: float, scale: torch.Tensor) -> torch.Tensor:
    """N-ITC with soft labels (TBPS-CLIP ``calc_contrastive``): cross-entropy of the row softmax of
    ``scale`` x cosine against alpha x (the same softmax from the no-grad features) + (1 - alpha) x Q,
    image->text and text->image averaged."""
    with torch.no_grad():
        soft_i2t = alpha * F.softmax(scale * image_soft @ text_soft.t(), dim=1) + (1 - alpha) * targets
        soft_t2i = alpha * F.softmax(scale * text_soft @ image_soft.t(), dim=1) + (1 - alpha) * targets
    i2t = -(F.log_softmax(scale * image @ text.t(), dim=1) * soft_i2t).sum(dim=1).mean()
    t2i = -(F.log_softmax(scale * text @ image.t(), dim=1) * soft_t2i).sum(dim=1).mean()
    return (i2t + t2i) / 2


def reversed_itc(image: torch.Tensor, text: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                 eps: float = 1e-2) -> torch.Tensor:
    """R-ITC: KL(P || Q + eps) of the row softmax P of ``scale`` x cosine, the two directions averaged
    (SDM's divergence with eps 1e-2, a learnable scale and a mean instead of a sum)."""
    return (_kl_to_target(scale * image @ text.t(), targets, eps) + _kl_to_target(scale * text @ image.t(), targets, eps)) / 2


def cyclic_itc(image: torch.Tensor, text: torch.Tensor, lambda_in: float = 0.25,
               lambda_cross: float = 0.25) -> torch.Tensor:
    """C-ITC (CyCLIP's form, as TBPS-CLIP's code): lambda_in x mean (u_i.u_j - v_i.v_j)^2 +
    lambda_cross x mean (u_i.v_j - v_i.u_j)^2 over all N^2 pairs. Upstream multiplies by the logit
    scale and divides by its square: it cancels, so it is left out (no gradient to it either)."""
    in_modal = (image @ image.t() - text @ text.t()).square().mean()
    cross = image @ text.t()
    return lambda_in * in_modal + lambda_cross * (cross - cross.t()).square().mean()


def simclr_loss(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent over 2N anchors (TBPS-CLIP ``compute_simclr_loss``): for each sample of view a the
    positive is its view b; the candidates are every view-b embedding and every other view-a one;
    symmetric, the two directions averaged. Embeddings are L2-normalised [N, D]."""
    labels = torch.arange(len(view_a), device=view_a.device)
    own = torch.eye(len(view_a), dtype=torch.bool, device=view_a.device)
    losses = []
    for q, k in ((view_a, view_b), (view_b, view_a)):
        same_view = (q @ q.t() / temperature).masked_fill(own, float("-inf"))
        losses.append(F.cross_entropy(torch.cat([q @ k.t() / temperature, same_view], dim=1), labels))
    return (losses[0] + losses[1]) / 2
