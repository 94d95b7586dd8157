"""CMT (UIT cross-modal triplet; SEN, Delong-liu-bupt/SEN @ 3d887c1: compute_tri in model/objectives.py) on a
hand-computed 4-sample batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import encoder_output
from model.heads import HEADS
from model.objectives import cmt_loss

PIDS = torch.tensor([0, 0, 1, 2])
IMAGES = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.0, 2.0], [-1.0, 0.0]], dtype=torch.float64)
TEXTS = torch.tensor([[4.0, 3.0], [0.0, 1.0], [1.0, 1.0], [-3.0, 4.0]], dtype=torch.float64)


def reference(images, texts, pids, margin=0.05, exclude="pid", hardest_positive=False, all_negatives=False):
    """The definition written out per anchor, with switches for the common mistakes."""
    sims = F.normalize(texts, dim=1) @ F.normalize(images, dim=1).t()
    total = 0.0
    for matrix in (sims, sims.t()):
        terms = []
        for a in range(len(pids)):
            negatives = [j for j in range(len(pids)) if (pids[j] != pids[a] if exclude == "pid" else j != a)]
            positives = [j for j in range(len(pids)) if pids[j] == pids[a]]
            pos = min(matrix[a, j] for j in positives) if hardest_positive else matrix[a, a]
            if all_negatives:
                terms.append(sum(max(0.0, float(matrix[a, j] - pos + margin)) for j in negatives))
            else:
                terms.append(max(0.0, float(max(matrix[a, j] for j in negatives) - pos + margin)))
        total += sum(terms) / len(terms)
    return total


def test_hand_computed_batch():
    assert cmt_loss(IMAGES, TEXTS, PIDS).item() == pytest.approx(0.3539214, abs=1e-6)
    assert reference(IMAGES, TEXTS, PIDS) == pytest.approx(0.3539214, abs=1e-6)


@pytest.mark.parametrize("mistake, value", [
    (dict(exclude="diagonal"), 0.4064214), (dict(hardest_positive=True), 0.7431981),
    (dict(margin=0.2), 0.5681981), (dict(all_negatives=True), 0.4021447)])
def test_values_of_common_mistakes_differ(mistake, value):
    assert reference(IMAGES, TEXTS, PIDS, **mistake) == pytest.approx(value, abs=1e-6)
    assert abs(cmt_loss(IMAGES, TEXTS, PIDS).item() - value) > 1e-3


def test_random_batches_match_the_reference():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        images = torch.randn(12, 8, generator=gen, dtype=torch.float64)
        texts = torch.randn(12, 8, generator=gen, dtype=torch.float64)
        pids = torch.randint(0, 4, (12,), generator=gen)
        assert cmt_loss(images, texts, pids).item() == pytest.approx(reference(images, texts, pids), abs=1e-9)


def test_gradients_reach_the_mined_negatives():
    images, texts = IMAGES.clone().requires_grad_(), TEXTS.clone().requires_grad_()
    cmt_loss(images, texts, PIDS).backward()
    assert images.grad[2].abs().sum() > 0 and texts.grad[2].abs().sum() > 0


def test_satisfied_margins_and_single_identity_give_zero():
    far = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    assert cmt_loss(far, far, PIDS).item() == 0.0  # every positive beats its hardest negative by > 0.05
    assert cmt_loss(IMAGES, TEXTS, torch.zeros(4, dtype=torch.long)).item() == 0.0  # no negatives


def test_head_weights_and_registers():
    head = HEADS["cmt"](margin=0.05, weight=10.0)
    out = encoder_output(IMAGES.float(), TEXTS.float())
    assert head({"pids": PIDS}, out, None)["cmt_loss"].item() == pytest.approx(3.539214, abs=1e-5)
