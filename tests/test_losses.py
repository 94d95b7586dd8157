"""Global losses: SDM, ITC, CMPM and the ID loss (IRRA, anosorae/IRRA @ cfc2378, model/objectives.py).

Each loss is compared with reference values that IRRA's model/objectives.py gives on a 4-sample toy
batch, and with an independent implementation written here from the formulas (explicit loops /
log-sum-exp, float64).
"""
import math

import pytest
import torch

from conftest import encoder_output
from model.heads.identity import IDHead
from model.objectives import cmpm_loss, itc_loss, sdm_loss

EPS = 1e-8

PIDS = torch.tensor([0, 0, 1, 2])
IMAGE = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                     dtype=torch.float64)
TEXT = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.8, 0.0], [0.1, 0.9, 0.1], [0.0, 0.2, 1.0]],
                    dtype=torch.float64)


# ---------------------------------------------------------------- independent references
def _unit(rows):
    return [[x / math.sqrt(sum(v * v for v in r)) for x in r] for r in rows]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _kl_rows(logits, target):
    """mean_i sum_j p_ij (log p_ij - log(q_ij + eps)), p the row softmax (pure Python)."""
    total = 0.0
    for row, q_row in zip(logits, target):
        p = _softmax(row)
        total += sum(pj * (math.log(pj) - math.log(qj + EPS)) for pj, qj in zip(p, q_row))
    return total / len(logits)


def _same_id(pids):
    return [[1.0 if a == b else 0.0 for b in pids] for a in pids]


def ref_sdm_halves(image, text, pids, scale):
    """(i2t, t2i) of SDM: S_ij = v_i . u_j with texts in rows; q = row-normalised labels."""
    u, v = _unit(image.tolist()), _unit(text.tolist())
    y = _same_id(pids.tolist())
    q = [[x / sum(r) for x in r] for r in y]
    t2i = [[scale * _dot(vi, uj) for uj in u] for vi in v]
    i2t = [[scale * _dot(ui, vj) for vj in v] for ui in u]
    return _kl_rows(i2t, q), _kl_rows(t2i, q)


def ref_itc(image, text, scale):
    u, v = _unit(image.tolist()), _unit(text.tolist())
    logits = [[scale * _dot(ui, vj) for vj in v] for ui in u]
    n = len(logits)

    def ce(mat):
        return sum(-math.log(_softmax(mat[i])[i]) for i in range(n)) / n

    cols = [list(c) for c in zip(*logits)]
    return 0.5 * (ce(logits) + ce(cols))


def ref_cmpm(image, text, pids):
    fi, ft = image.tolist(), text.tolist()
    u, v = _unit(fi), _unit(ft)
    y = _same_id(pids.tolist())
    q = [[x / math.sqrt(sum(t * t for t in r)) for x in r] for r in y]  # L2 norm, not the sum
    a = [[_dot(f, vj) for vj in v] for f in fi]  # image projected on text unit vectors
    b = [[_dot(f, uj) for uj in u] for f in ft]  # text projected on image unit vectors
    return _kl_rows(a, q) + _kl_rows(b, q)


# ---------------------------------------------------------------- 4-sample toy batch
def test_sdm_reference_value():
    loss = sdm_loss(IMAGE, TEXT, PIDS, 50.0)
    assert loss.item() == pytest.approx(0.680894, abs=1e-6)


def test_sdm_halves_match_reference_and_independent_formula():
    i2t, t2i = ref_sdm_halves(IMAGE, TEXT, PIDS, 50.0)
    assert i2t == pytest.approx(0.336113, abs=1e-6)
    assert t2i == pytest.approx(0.344781, abs=1e-6)
    assert sdm_loss(IMAGE, TEXT, PIDS, 50.0).item() == pytest.approx(i2t + t2i, abs=1e-6)


def test_sdm_is_a_sum_not_a_mean_and_unweighted():
    i2t, t2i = ref_sdm_halves(IMAGE, TEXT, PIDS, 50.0)
    loss = sdm_loss(IMAGE, TEXT, PIDS, 50.0).item()
    assert abs(loss - (i2t + t2i) / 2) > 0.3  # an average would be 0.34


def test_sdm_float32_matches_float64():
    loss32 = sdm_loss(IMAGE.float(), TEXT.float(), PIDS, 50.0)
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(0.680894, abs=1e-5)


@pytest.mark.parametrize("scale, expected", [(1 / 0.07, 1.110952)])
def test_sdm_wrong_scale_gives_other_value(scale, expected):
    """Scale 1/0.07 (CLIP's) instead of 50 gives a visibly different loss: the test can fail."""
    loss = sdm_loss(IMAGE, TEXT, PIDS, scale).item()
    assert loss == pytest.approx(expected, abs=1e-6)
    assert abs(loss - 0.680894) > 0.1


def test_sdm_identity_labels_mistake_value():
    """Ignoring pids (identity matrix as labels) gives 0.026887, not 0.680894."""
    loss = sdm_loss(IMAGE, TEXT, torch.arange(4), 50.0).item()
    assert loss == pytest.approx(0.026887, abs=1e-6)
    assert loss == pytest.approx(sum(ref_sdm_halves(IMAGE, TEXT, torch.arange(4), 50.0)), abs=1e-7)


def test_sdm_symmetric_in_modalities():
    assert sdm_loss(IMAGE, TEXT, PIDS, 50.0).item() == pytest.approx(
        sdm_loss(TEXT, IMAGE, PIDS, 50.0).item(), abs=1e-12)
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    pids = torch.tensor([3, 1, 3, 0, 1, 2])
    assert sdm_loss(img, txt, pids, 50.0).item() == pytest.approx(sdm_loss(txt, img, pids, 50.0).item(), abs=1e-10)


def test_sdm_random_batch_matches_independent_formula():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(8, 6, generator=g, dtype=torch.float64) * 3
    txt = torch.randn(8, 6, generator=g, dtype=torch.float64) * 0.5
    pids = torch.tensor([0, 1, 1, 2, 2, 2, 3, 0])
    for scale in (50.0, 10.0):
        ref = sum(ref_sdm_halves(img, txt, pids, scale))
        assert sdm_loss(img, txt, pids, scale).item() == pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_sdm_invariant_to_feature_norms():
    """SDM normalises both sides: scaling features by positive factors changes nothing."""
    scales = torch.tensor([[2.0], [0.1], [7.0], [1.5]], dtype=torch.float64)
    a = sdm_loss(IMAGE, TEXT, PIDS, 50.0).item()
    b = sdm_loss(IMAGE * scales, TEXT * scales.flip(0), PIDS, 50.0).item()
    assert a == pytest.approx(b, abs=1e-9)


def test_itc_reference_value():
    loss = itc_loss(IMAGE, TEXT, 50.0).item()
    assert loss == pytest.approx(0.001117, abs=1e-6)
    assert loss == pytest.approx(ref_itc(IMAGE, TEXT, 50.0), rel=1e-9)


def test_itc_random_batch_matches_independent_formula():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(5, 4, generator=g, dtype=torch.float64)
    txt = torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert itc_loss(img, txt, 7.0).item() == pytest.approx(ref_itc(img, txt, 7.0), rel=1e-9)


def test_cmpm_reference_value():
    loss = cmpm_loss(IMAGE, TEXT, PIDS).item()
    assert loss == pytest.approx(14.996960, rel=1e-5)
    assert loss == pytest.approx(ref_cmpm(IMAGE, TEXT, PIDS), rel=1e-6)


def test_cmpm_uses_unnormalised_features_and_l2_label_norm():
    g = torch.Generator().manual_seed(3)
    img = torch.randn(6, 4, generator=g, dtype=torch.float64) * 2
    txt = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3
    pids = torch.tensor([0, 0, 0, 1, 2, 2])
    ref = ref_cmpm(img, txt, pids)
    assert cmpm_loss(img, txt, pids).item() == pytest.approx(ref, rel=1e-6)
    # un-normalised projections: rescaling the features changes the loss
    assert abs(cmpm_loss(img * 3, txt, pids).item() - ref) > 1e-3


# ---------------------------------------------------------------- ID loss
def test_id_loss_shared_classifier_mean_of_two_ce():
    torch.manual_seed(0)
    head = IDHead(embed_dim=3, num_classes=4)
    # exactly one Linear, shared by both modalities
    assert [type(m).__name__ for m in head.modules()].count("Linear") == 1
    with torch.no_grad():
        head.classifier.weight.copy_(torch.randn(4, 3))
        head.classifier.bias.copy_(torch.randn(4))
    img, txt = IMAGE.float() * 2, TEXT.float() * 3
    out = encoder_output(img, txt)
    res = head({"pids": PIDS}, out, encoder=None)

    w = head.classifier.weight.detach().double().tolist()
    b = head.classifier.bias.detach().double().tolist()

    def ce(feats):
        tot = 0.0
        for f, pid in zip(feats.double().tolist(), PIDS.tolist()):
            logits = [_dot(wr, f) + br for wr, br in zip(w, b)]
            m = max(logits)
            lse = m + math.log(sum(math.exp(x - m) for x in logits))
            tot += lse - logits[pid]
        return tot / len(feats)

    ce_img, ce_txt = ce(img), ce(txt)
    assert abs(ce_img - ce_txt) > 1e-3  # the two halves really differ
    assert res["id_loss"].item() == pytest.approx(0.5 * (ce_img + ce_txt), rel=1e-5)

    def acc(feats):
        hits = 0
        for f, pid in zip(feats.double().tolist(), PIDS.tolist()):
            logits = [_dot(wr, f) + br for wr, br in zip(w, b)]
            hits += int(max(range(4), key=lambda k: logits[k]) == pid)
        return hits / len(feats)

    assert res["img_acc"].item() == pytest.approx(acc(img))
    assert res["txt_acc"].item() == pytest.approx(acc(txt))


def test_id_head_weight_scales_loss_and_init():
    torch.manual_seed(0)
    head1, head2 = IDHead(3, 4, weight=1.0), IDHead(3, 4, weight=2.5)
    head2.load_state_dict(head1.state_dict())
    img, txt = IMAGE.float(), TEXT.float()
    out = encoder_output(img, txt)
    l1 = head1({"pids": PIDS}, out, None)["id_loss"]
    l2 = head2({"pids": PIDS}, out, None)["id_loss"]
    assert l2.item() == pytest.approx(2.5 * l1.item(), rel=1e-6)
    # near-zero classifier at init (std 0.001, bias 0): loss is about log(C)
    assert l1.item() == pytest.approx(math.log(4), abs=0.01)
    assert torch.count_nonzero(head1.classifier.bias) == 0
