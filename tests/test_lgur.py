"""LGUR head (Shao et al., ACM MM 2022; code ZhiyinShao-H/LGUR @ c203cc7).

Values marked "LGUR's own code" come from running LGUR's modules and losses (vit_pytorch.py
mydecoder, model/DETR_model.py text_DETR/image_fusion/image_DETR, loss/Id_loss.py,
loss/RankingLoss.py) on weights copied from our head and on the inputs these tests rebuild, in
float64, outside this repository: our streams matched them within 4e-15."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model_config
from model.build import build_model
from processor.processor import metric_blocks
from model.heads.lgur import LGURHead, concat_cosine, semi_hard_ranking
from solver.build import build_optimizer

pytestmark = pytest.mark.usefixtures("single_thread")

HAND_S = torch.tensor([[0.90, 0.70, 0.20], [0.40, 0.80, 0.95], [0.10, 0.45, 0.60]])


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    return LGURHead(512, num_classes=11)


def _tokens(batch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 193, 512, generator=gen)  # CLS + 24 x 8 patches
    text = torch.randn(batch, 77, 512, generator=gen)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    for b in range(batch):
        n = 5 + 3 * b
        ids[b, 0], ids[b, n + 1] = 49406, 49407
        ids[b, 1:n + 1] = torch.randint(1, 49405, (n,), generator=gen)
    return image, text, ids


# ---------------------------------------------------------------- shapes, counts, sharing
def test_shapes(head):
    image, text, ids = _tokens()
    patches = image[:, 1:]
    gate = head.mask(patches)
    assert gate.shape == (4, 192, 1) and ((gate > 0) & (gate < 1)).all()
    stream, keep = head.text_stream(text, ids)
    assert stream.shape == (4, 15, 512) and keep.sum(1).tolist() == [6, 9, 12, 15]  # SOT+1..EOT
    assert head.reconstruct(stream).shape == (4, 15, 512)
    assert head.reconstruct(patches).shape == head.reconstruct(patches, stream, keep).shape == (4, 192, 512)
    assert head.unify(stream, keep).shape == (6, 4, 512)
    assert head.image_features(patches).shape == head.text_features(text, ids).shape == (4, 3072)


def test_parameter_counts(head):
    """LGUR at width 512, without classifiers (and its unused positional parameter): 16,996,609."""
    counted = sum(p.numel() for n, p in head.named_parameters() if not n.startswith("classifiers"))
    assert counted == 16_996_609
    assert sum(p.numel() for p in head.classifiers.parameters()) == 6 * (512 * 11 + 11)
    assert head.dictionary.shape == (400, 512) and head.prototypes.shape == (6, 512)
    assert len(head.projections) == len(head.classifiers) == 6
    layer = head.pgu.layers[0]
    assert layer.to_q.bias is None and layer.to_kv.bias is None and layer.to_out.bias is not None
    assert layer.to_q.weight.shape == (3072, 512)  # 6 heads x 512: LGUR's PGU inner width


def test_every_part_gets_gradients_from_one_step():
    cfg = tiny_model_config(loss_names="lgur", embed_dim=64)
    torch.manual_seed(0)
    model = build_model(cfg, 4)
    from ddp_reference import fixed_batch
    batch = fixed_batch()
    batch["pids"] = batch["pids"] % 4
    batch["caption_ids"] = F.pad(batch["caption_ids"], (0, 61))
    out = model(batch)
    out["lgur_loss"].backward()
    head = model.heads["lgur"]
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.encoder.visual.conv1.weight.grad.abs().sum() > 0  # it trains the encoders too
    assert model.encoder.token_embedding.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- masking and the image path
def test_padding_and_sot_never_matter_and_valid_tokens_do(head):
    image, text, ids = _tokens()
    patches = image[:, 1:]
    torch.manual_seed(1)
    streams = lambda t: (head.unify(*head.text_stream(t, ids)),  # noqa: E731
                         head.unify(head.reconstruct(head.text_stream(t, ids)[0]), head.text_stream(t, ids)[1]),
                         head.reconstruct(patches, *head.text_stream(t, ids)))
    base = streams(text)
    noisy = text.clone()
    eot = ids.argmax(1)
    for b in range(4):
        noisy[b, eot[b] + 1:] = 100 * torch.randn(77 - eot[b] - 1, 512)
        noisy[b, 0] = 100 * torch.randn(512)  # SOT: the same for every caption in CLIP, never a key
    for a, b in zip(base, streams(noisy)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    valid = text.clone()
    valid[0, 2] += torch.randn(512)
    assert not torch.allclose(base[0][:, 0], streams(valid)[0][:, 0])


def test_masked_keys_get_exactly_zero_attention(head):
    """The layer's attention probabilities, written out from its weights: 0 on masked keys, rows sum to 1."""
    _, text, ids = _tokens()
    stream, keep = head.text_stream(text, ids)
    layer = head.pgu.layers[0]
    queries = head.prototypes.expand(4, -1, -1)
    q = layer.to_q(layer.norm(queries)).view(4, 6, 6, 512).transpose(1, 2)
    k = layer.to_kv(layer.norm(stream)).chunk(2, dim=-1)[0].view(4, -1, 6, 512).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) * 512 ** -0.5
    probs = logits.masked_fill(~keep[:, None, None, :], -torch.finfo(logits.dtype).max).softmax(-1)
    assert (probs.masked_select(~keep[:, None, None, :].expand_as(probs)) == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def test_the_image_path_is_text_free_and_batch_independent(head):
    image, _, _ = _tokens()
    all_rows = head.image_features(image[:, 1:])
    for i in range(4):
        torch.testing.assert_close(head.image_features(image[i:i + 1, 1:]), all_rows[i:i + 1], atol=1e-5, rtol=1e-5)
    import inspect
    assert list(inspect.signature(head.gallery_features).parameters) == ["image"]  # no caption can reach it


# ---------------------------------------------------------------- LGUR's own code, pinned
def test_streams_equal_lgur_on_the_same_weights():
    torch.manual_seed(0)
    head = LGURHead(384, num_classes=7).double()
    gen = torch.Generator().manual_seed(1)
    patches = torch.randn(2, 192, 384, generator=gen, dtype=torch.float64)
    text = torch.randn(2, 12, 384, generator=gen, dtype=torch.float64)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, 7:] = False
    with torch.no_grad():
        gate = head.mask(patches)
        guided = head.reconstruct(patches, text, keep) * gate
        sums = [guided.sum(), head.unify(guided).sum(), head.unify(head.reconstruct(patches) * gate).sum(),
                head.unify(text, keep).sum(), head.unify(head.reconstruct(text), keep).sum()]
    lgur = [-252.7695721642, 106.9476889909, 95.9211006009, 78.3669082592, 86.0068741738]
    assert [float(s) for s in sums] == pytest.approx(lgur, abs=1e-8)


def test_id_loss_equals_lgur():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 8, 512, generator=gen, dtype=torch.float64)
    b = 0.2 * a + torch.randn(6, 8, 512, generator=gen, dtype=torch.float64)
    torch.manual_seed(3)
    head = LGURHead(64, num_classes=5).double()
    loss = head.id_loss(a, b, torch.tensor([0, 1, 0, 2, 3, 1, 4, 2]))[0]
    assert loss.item() == pytest.approx(3.2148578974522075, abs=1e-12)


def test_ranking_loss_equals_lgur_with_the_same_draws():
    """LGUR's RankingLoss with its np.random.choice fed our generator's picks (16 triplets)."""
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 8, 512, generator=gen, dtype=torch.float64)
    b = 0.2 * a + torch.randn(6, 8, 512, generator=gen, dtype=torch.float64)
    sims = concat_cosine(a, b)
    loss = semi_hard_ranking(sims, torch.tensor([0, 1, 0, 2, 3, 1, 4, 2]), 0.3, torch.Generator().manual_seed(9))
    assert loss.item() == pytest.approx(1.6712390767030176, abs=1e-12)


# ---------------------------------------------------------------- losses by hand
@pytest.mark.parametrize("labels, upstream, symmetric", [([0, 1, 2], 0.25, 0.45), ([0, 0, 2], 0.15, 0.15)])
def test_ranking_hand_values(labels, upstream, symmetric):
    """Each anchor has at most one candidate, so the draws do not matter. A hardest-negative loss gives 1.55."""
    y = torch.tensor(labels)
    assert semi_hard_ranking(HAND_S, y, 0.3, torch.Generator()).item() == pytest.approx(upstream)
    assert semi_hard_ranking(HAND_S, y, 0.3, torch.Generator(), symmetric=True).item() == pytest.approx(symmetric)


def test_ranking_without_candidates_or_negatives_is_zero():
    sims = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    assert semi_hard_ranking(sims, torch.tensor([0, 1]), 0.3, torch.Generator()).item() == 0.0
    assert semi_hard_ranking(sims, torch.tensor([0, 0]), 0.3, torch.Generator()).item() == 0.0  # LGUR would crash


def test_ranking_terms_lie_between_zero_and_the_margin_in_symmetric_mode():
    gen = torch.Generator().manual_seed(5)
    for _ in range(50):
        sims = torch.rand(16, 16, generator=gen) * 0.4 + torch.eye(16) * 0.2
        pids = torch.randint(0, 6, (16,), generator=gen)
        loss = semi_hard_ranking(sims, pids, 0.3, gen, symmetric=True)
        assert 0 <= loss.item() <= 2 * 16 * 0.3


def test_concatenated_cosine_is_not_the_mean_of_part_cosines():
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(6, 4, 512, generator=gen), torch.randn(6, 4, 512, generator=gen)
    whole = concat_cosine(a, b)
    expected = F.normalize(torch.cat(list(a), 1), dim=1) @ F.normalize(torch.cat(list(b), 1), dim=1).t()
    torch.testing.assert_close(whole, expected)
    per_part = torch.stack([F.normalize(a[k], dim=1) @ F.normalize(b[k], dim=1).t() for k in range(6)]).mean(0)
    assert not torch.allclose(whole, per_part, atol=1e-3)


@pytest.mark.parametrize("classes", [11000, 3102])
def test_id_terms_start_at_two_log_c(classes):
    torch.manual_seed(0)
    head = LGURHead(64, num_classes=classes)
    parts = torch.randn(6, 16, 512)
    loss = head.id_loss(parts, parts.roll(1, 1), torch.randint(0, classes, (16,)))[0]
    assert loss.item() == pytest.approx(2 * math.log(classes), abs=0.05)


# ---------------------------------------------------------------- optimiser, config
def test_parameter_groups_follow_lgur():
    cfg = tiny_model_config(loss_names="sdm+lgur", embed_dim=64, lr=1e-5, optimizer_eps=1e-3, weight_decay=4e-5)
    torch.manual_seed(0)
    model = build_model(cfg, 4)
    optimizer = build_optimizer(cfg, model)
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    for name, lr in (("heads.lgur.dictionary", 1e-4), ("heads.lgur.pgu.layers.0.to_q.weight", 1e-4),
                     ("heads.lgur.mask.0.weight", 1e-4), ("heads.lgur.projections.0.weight", 1e-3),
                     ("heads.lgur.classifiers.5.bias", 1e-3)):
        group = groups[id(params[name])]
        assert (group["lr"], group["weight_decay"], group["eps"]) == (lr, 0.0, 1e-8), name
    encoder = groups[id(params["encoder.visual.conv1.weight"])]
    assert (encoder["lr"], encoder["weight_decay"], encoder["eps"]) == (1e-5, 4e-5, 1e-3)


def test_irra_aliasing_is_refused():
    from utils.errors import ConfigError
    with pytest.raises(ConfigError, match="lgur reads the clean caption: turn global_sees_masked_caption off"):
        build_model(tiny_model_config(loss_names="lgur", global_sees_masked_caption=True), 4)


# ---------------------------------------------------------------- training and retrieval
def test_head_alone_converges_on_identity_dependent_tokens():
    """8 identities x 2 pairs, frozen random 'backbone' tokens with an identity component: every loss
    term falls and training-set t2i R1 with the retrieval features reaches 100 %."""
    torch.manual_seed(0)
    head = LGURHead(64, num_classes=8, dict_size=50)
    gen = torch.Generator().manual_seed(1)
    pids = torch.arange(8).repeat_interleave(2)
    identity_image, identity_text = torch.randn(8, 1, 64, generator=gen), torch.randn(8, 1, 64, generator=gen)
    patches = identity_image[pids] + 0.5 * torch.randn(16, 8, 64, generator=gen)
    text = torch.zeros(16, 8, 64)
    text[:, :6] = identity_text[pids] + 0.5 * torch.randn(16, 6, 64, generator=gen)
    ids = torch.zeros(16, 8, dtype=torch.long)
    ids[:, 0], ids[:, 1:5], ids[:, 5] = 49406, 1, 49407
    from conftest import encoder_output
    out = encoder_output(torch.zeros(16, 64), torch.zeros(16, 64))
    out.image.tokens = torch.cat([torch.zeros(16, 1, 64), patches], 1)
    out.text.tokens, out.text.ids = text, ids
    groups = [{"params": [p for n, p in head.named_parameters() if not n.startswith(("projections", "classifiers"))],
               "lr": 1e-4}, {"params": [*head.projections.parameters(), *head.classifiers.parameters()], "lr": 1e-3}]
    optimizer = torch.optim.Adam(groups)
    keys = ("lgur_id", "lgur_id_dict", "lgur_rank", "lgur_rank_dict", "lgur_rank_text", "lgur_rank_image")
    history = []
    for _ in range(60):
        result = head({"pids": pids}, out, None)
        optimizer.zero_grad()
        result["lgur_loss"].backward()
        optimizer.step()
        history.append({k: result[k].item() for k in keys + ("lgur_mask_mean",)})
    first, last = history[0], history[-1]
    for key in keys[:2]:
        assert last[key] < 0.5 * first[key], key
    assert sum(last[k] for k in keys[2:]) < sum(first[k] for k in keys[2:])
    assert 0.05 < last["lgur_mask_mean"] < 0.95  # the gate does not collapse
    with torch.no_grad():
        sims = F.normalize(head.text_features(text, ids), dim=1) @ F.normalize(head.image_features(patches), dim=1).t()
    assert (pids[sims.argmax(1)] == pids).all()


def test_retrieval_ranks_with_lgur_features_alone(toy_root, tmp_path):
    import test as test_entry
    import train as train_entry
    from test_end_to_end import REPO, TINY
    run = tmp_path / "run"
    train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root),
                      "--output_dir", str(run), "--loss_names", "lgur", "--num_epoch", "1",
                      "--lgur_dict_size", "40"])
    out = tmp_path / "eval"
    results = test_entry.main(["--config_file", str(run / "configs.yaml"), "--output_dir", str(out),
                               "--save_features"])
    assert list(metric_blocks(results)) == ["t2i", "t2i_global", "t2i_lgur", "i2t"]
    assert results["t2i"] == results["t2i_lgur"] != results["t2i_global"]
    features = torch.load(out / "features.pt")
    assert features["text_feats"].shape == (32, 6 * 512)  # the unified parts, not CLS/EOT
    torch.testing.assert_close(features["text_feats"], features["text_feats_lgur"])


@pytest.mark.parametrize("name, dataset, split", [("cuhk_pedes", "CUHK-PEDES", "val"), ("icfg_pedes", "ICFG-PEDES", "test"),
                                                  ("rstpreid", "RSTPReid", "val")])
def test_lgur_configs(name, dataset, split):
    from test_end_to_end import REPO
    from utils.options import build_parser, resolve
    cfg = resolve(build_parser("t").parse_args(["--config_file", str(REPO / f"configs/lgur/{name}.yaml")]))
    assert (cfg.dataset_name, cfg.val_dataset, cfg.loss_names, cfg.batch_size) == (dataset, split, "lgur", 64)
    assert (cfg.lgur_rank_mode, cfg.lgur_margin, cfg.lgur_lr, cfg.lgur_proj_lr, cfg.lgur_eps) == \
        ("upstream", 0.3, 1e-4, 1e-3, 1e-8)
    assert (cfg.lgur_dict_size, cfg.lgur_prototypes, cfg.lgur_part_dim, cfg.lgur_global_weight) == (400, 6, 512, 0.0)
    assert not cfg.global_sees_masked_caption and not cfg.MLM
