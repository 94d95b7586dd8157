"""SCMM-style heads (our reconstruction: SCMM, arXiv 2304.02278, has no code): the Sew calibration loss
on a hand-computed batch, its limits, invariances and gradient; caption quality; MCM masking, loss,
wiring and detachability; a short toy run."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import demo_config, tiny_model_config
from datasets.captions import MaskingConfig
from datasets.fields import MCMCaption
from model.build import build_model
from model.heads.scmm import SewHead, caption_margins, sew_loss_from_sim, token_counts
from utils.errors import ConfigError
from utils.simple_tokenizer import SimpleTokenizer, tokenize

IMAGES = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
CAPTIONS = torch.tensor([[0.8, 0.0, 0.6], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8]], dtype=torch.float64)
PIDS = torch.tensor([0, 0, 1])
COUNTS = torch.tensor([20, 40, 60])


def _sew(images=IMAGES, captions=CAPTIONS, pids=PIDS, counts=COUNTS, low=0.1, high=0.3, scale=10.0,
         mode="mean", constant=False):
    margins = caption_margins(counts, 20, 60, low, high, constant).double()
    sims = F.normalize(images, dim=1) @ F.normalize(captions, dim=1).t()
    return sew_loss_from_sim(sims, pids, margins, scale, mode)


# ---------------------------------------------------------------- V1-V4: the loss
def test_hand_computed_batch():
    loss, i2t, t2i = _sew()
    assert (loss.item(), i2t.item(), t2i.item()) == pytest.approx((1.231692, 1.361988, 1.101395), abs=1e-6)
    margins = caption_margins(COUNTS, 20, 60, 0.1, 0.3)
    assert margins.tolist() == pytest.approx([0.1, 0.2, 0.3])
    sims = IMAGES @ F.normalize(CAPTIONS, dim=1).t()
    row0 = -(torch.log_softmax(10 * (sims[0] - torch.tensor([1, 1, 0]) * margins.double()), 0)[:2]).mean()
    assert row0.item() == pytest.approx(1.549456, abs=1e-6)


@pytest.mark.parametrize("change, expected", [
    (dict(low=0.0, high=0.0), 0.971156),
    (dict(low=0.3, high=0.1), 1.215361),
    (dict(low=0.05, high=0.20, scale=50.0), 4.449008),
    (dict(pids=torch.tensor([0, 1, 2]), low=0.0, high=0.0), 0.104490),
    (dict(pids=torch.tensor([0, 1, 2])), 0.494498),
    (dict(mode="sum"), 0.304270),
    (dict(counts=torch.tensor([5, 40, 100])), 1.231692),
    (dict(constant=True), 1.164460),
])
def test_limits_and_knobs(change, expected):
    assert _sew(**change)[0].item() == pytest.approx(expected, abs=1e-5)


def test_no_margin_and_distinct_ids_is_symmetric_itc():
    logits = 10 * F.normalize(IMAGES, dim=1) @ F.normalize(CAPTIONS, dim=1).t()
    labels = torch.arange(3)
    itc = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert _sew(pids=labels, low=0.0, high=0.0)[0].item() == pytest.approx(itc.item(), abs=1e-12)


def test_invariances():
    assert _sew(images=2 * IMAGES, captions=3 * CAPTIONS)[0].item() == pytest.approx(1.231692, abs=1e-6)
    perm = torch.tensor([2, 0, 1])
    assert _sew(IMAGES[perm], CAPTIONS[perm], PIDS[perm], COUNTS[perm])[0].item() == pytest.approx(1.231692, abs=1e-6)
    _, i2t, t2i = _sew(low=0.2, high=0.2)
    _, swapped_i2t, swapped_t2i = _sew(images=CAPTIONS, captions=IMAGES, low=0.2, high=0.2)
    assert (i2t.item(), t2i.item()) == pytest.approx((1.160298, 1.168623), abs=1e-6)
    assert (swapped_i2t.item(), swapped_t2i.item()) == pytest.approx((t2i.item(), i2t.item()), abs=1e-12)
    _, unequal_i2t, _ = _sew(images=CAPTIONS, captions=IMAGES)
    assert unequal_i2t.item() != pytest.approx(_sew()[2].item(), abs=1e-3)  # the margin follows the caption


def test_gradient_of_the_similarities():
    sims = (F.normalize(IMAGES, dim=1) @ F.normalize(CAPTIONS, dim=1).t()).requires_grad_()
    margins = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    loss, _, _ = sew_loss_from_sim(sims, PIDS, margins, 10.0)
    loss.backward()
    expected = torch.tensor([[0.981302, -1.543385, 0.010406], [-1.288755, 1.430959, 0.354956],
                             [1.606813, 0.003826, -1.556123]], dtype=torch.float64)
    torch.testing.assert_close(sims.grad, expected, atol=1e-4, rtol=0)
    assert sims.grad[0, 0] > 0 and not margins.requires_grad  # a positive pushed down: mean, not sum


def test_margins_make_single_positive_rows_stricter():
    """With one positive per row the loss grows with the margin (with several positives the margins
    only shift them relative to each other)."""
    distinct = torch.tensor([0, 1, 2])
    values = [_sew(pids=distinct, low=m, high=m)[0].item() for m in (0.0, 0.1, 0.2, 0.3)]
    assert values == sorted(values) and values[0] < values[-1]


# ---------------------------------------------------------------- V5: caption quality
def test_token_counts_and_percentiles(toy_root):
    row = torch.zeros(2, 77, dtype=torch.long)
    row[0, :5] = torch.tensor([49406, 320, 1125, 530, 49407])
    row[1, 0], row[1, 1:76], row[1, 76] = 49406, 320, 49407
    assert token_counts(row).tolist() == [3, 75]
    assert np.percentile(np.arange(10, 101, 10), [5, 95]).tolist() == pytest.approx([14.5, 95.5])
    tokenizer = SimpleTokenizer()
    caption = "A young woman wearing a black jacket, blue jeans and white sneakers."
    assert token_counts(tokenize(caption, tokenizer, 77)[None]).item() == len(tokenizer.encode(caption))
    cfg = demo_config(toy_root, "--loss_names", "sew")
    assert cfg.sew_len_low == cfg.sew_len_high == -1.0  # auto
    from datasets import build_dataset
    dataset = build_dataset("CUHK-PEDES", toy_root)
    SewHead.configure(cfg, dataset, tokenizer)
    counts = [min(len(tokenizer.encode(c)), 75) for *_, c in dataset.train]
    assert (cfg.sew_len_low, cfg.sew_len_high) == tuple(np.percentile(counts, [5, 95]).tolist())


def test_length_bounds_must_increase():
    with pytest.raises(ConfigError, match="sew needs sew_len_high > sew_len_low, got sew_len_low 30 and sew_len_high 30"):
        SewHead(50.0, 30, 30)
    with pytest.raises(ConfigError, match="sew_len_low / sew_len_high are still 'auto'"):
        build_model(tiny_model_config(loss_names="sew"), 4)


# ---------------------------------------------------------------- V6-V8: MCM
def test_mcm_masking_statistics_and_the_clean_caption(tokenizer):
    random.seed(0)
    build = MCMCaption(tokenizer, MaskingConfig(0.15, 0.8, 0.1))
    gen = torch.Generator().manual_seed(0)
    selected = eligible = 0
    kinds = {"mask": 0, "random": 0, "same": 0}
    for _ in range(6000):
        ids = torch.zeros(77, dtype=torch.long)
        ids[0], ids[21] = 49406, 49407
        ids[1:21] = torch.randint(1, 49405, (20,), generator=gen)
        sample = {"caption_ids": ids.clone()}
        build(sample, None)
        assert torch.equal(sample["caption_ids"], ids)  # the clean caption is unchanged
        labels, masked = sample["mcm_labels"], sample["mcm_ids"]
        chosen = labels != 0
        assert chosen.any() and not chosen[0] and not chosen[21:].any()
        assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
        selected, eligible = selected + int(chosen.sum()), eligible + 20
        for new, old in zip(masked[chosen].tolist(), ids[chosen].tolist()):
            kinds["mask" if new == 49405 else "same" if new == old else "random"] += 1
    assert selected / eligible == pytest.approx(0.15, abs=0.005)
    total = sum(kinds.values())
    assert (kinds["mask"] / total, kinds["random"] / total) == pytest.approx((0.8, 0.1), abs=0.015)


def test_a_caption_without_content_gets_no_label(tokenizer):
    ids = torch.zeros(77, dtype=torch.long)
    ids[0], ids[1] = 49406, 49407
    sample = {"caption_ids": ids}
    MCMCaption(tokenizer, MaskingConfig())(sample, None)
    assert not sample["mcm_labels"].any() and torch.equal(sample["mcm_ids"], ids)


def _mcm_batch(seed=0):
    from ddp_reference import fixed_batch
    batch = fixed_batch()
    batch["caption_ids"] = F.pad(batch["caption_ids"], (0, 61))
    masked, labels = batch["caption_ids"].clone(), torch.zeros_like(batch["caption_ids"])
    masked[:, [2, 4]], labels[:, [2, 4]] = 49405, batch["caption_ids"][:, [2, 4]]
    return {**batch, "mcm_ids": masked, "mcm_labels": labels}


class _Logits(torch.nn.Module):
    """Stands in for the vocabulary classifier: fixed logits for the labelled positions."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[:len(x)]


def test_mcm_loss_on_crafted_logits():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(loss_names="mcm"), 6)
    head, batch = model.heads["mcm"], _mcm_batch()
    out = model.encode(batch)
    targets = batch["mcm_labels"][batch["mcm_labels"] != 0]
    head.mlm_head = _Logits(torch.zeros(len(targets), 49408))
    assert head(batch, out, model.encoder)["mcm_loss"].item() == pytest.approx(math.log(49408), abs=1e-5)
    head.mlm_head = _Logits(F.one_hot(targets, 49408).float() * 100)
    assert head(batch, out, model.encoder)["mcm_loss"].item() < 1e-6


def test_mcm_decoder_size_and_wiring():
    cfg = tiny_model_config(loss_names="mcm", embed_dim=512, mcm_depth=4)
    torch.manual_seed(0)
    head = build_model(cfg, 6).heads["mcm"]
    decoder = sum(p.numel() for n, p in head.named_parameters() if not n.startswith("mlm_head"))
    assert (decoder, sum(p.numel() for p in head.mlm_head.parameters())) == (13_663_232, 25_609_984)
    text, image = torch.randn(2, 77, 512), torch.randn(2, 9, 512)
    base = head.cross_former(text, image)
    assert not torch.allclose(base, head.cross_former(text, torch.randn(2, 9, 512)))  # the image is read
    with torch.no_grad():
        head.cross_attn.out_proj.weight.zero_()
        head.cross_attn.out_proj.bias.zero_()
    flat = head.cross_former(text, image)  # no residual around the cross-attention: nothing of the text is left
    torch.testing.assert_close(flat[:, 0:1].expand_as(flat), flat)
    torch.testing.assert_close(flat, head.cross_former(torch.randn(2, 77, 512), image))


def test_mcm_and_mlm_together_are_refused():
    with pytest.raises(ConfigError, match="mcm and mlm are the same decoder"):
        build_model(tiny_model_config(loss_names="mlm+mcm"), 6)


# ---------------------------------------------------------------- V9-V10: detachable, smoke
def test_evaluation_does_not_need_the_mcm_head(toy_root):
    from datasets import build_dataset
    from datasets.build import build_eval_loaders
    from processor.evaluation import Evaluator
    cfg = demo_config(toy_root, "--loss_names", "sew+mcm", "--sew_len_low", "5", "--sew_len_high", "20")
    dataset = build_dataset("CUHK-PEDES", toy_root)
    torch.manual_seed(0)
    full = build_model(cfg, dataset.num_classes)
    cfg.loss_names = "sew"
    stripped = build_model(cfg, dataset.num_classes)
    stripped.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("heads.mcm.")})
    loaders = build_eval_loaders(cfg, dataset, SimpleTokenizer())
    a = Evaluator(*loaders).eval(full, torch.device("cpu"))
    b = Evaluator(*loaders).eval(stripped, torch.device("cpu"))
    assert torch.equal(a.text.combined, b.text.combined) and torch.equal(a.image.combined, b.image.combined)
    assert a.results == b.results


def test_two_steps_and_gradient_reach():
    cfg = tiny_model_config(loss_names="sew+mcm", sew_len_low=2.0, sew_len_high=10.0)
    torch.manual_seed(0)
    model = build_model(cfg, 6)
    batch = _mcm_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(2):
        out = model(batch)
        assert math.isfinite(out["sew_loss"].item()) and math.isfinite(out["mcm_loss"].item())
        optimizer.zero_grad()
        (out["sew_loss"] + out["mcm_loss"]).backward()
        for name in ("encoder.visual.conv1.weight", "encoder.token_embedding.weight",
                     "heads.mcm.cross_attn.in_proj_weight", "heads.mcm.mlm_head.fc.weight"):
            assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
        optimizer.step()
    distinct = {**batch, "pids": torch.arange(8)}
    out = model.encode(distinct)
    sew = model.heads["sew"]
    with_margin = sew(distinct, out, model.encoder)["sew_loss"].item()
    sew.margin_low = sew.margin_high = 0.0
    assert with_margin >= sew(distinct, out, model.encoder)["sew_loss"].item()


def test_toy_run_logs_both_losses(toy_root, tmp_path):
    import train as train_entry
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_end_to_end import REPO, TINY
    run = tmp_path / "run"
    train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root),
                      "--output_dir", str(run), "--loss_names", "sew+mcm", "--num_epoch", "2"])
    events = EventAccumulator(str(run))
    events.Reload()
    for tag in ("train/sew_loss", "train/mcm_loss", "train/sew_margin_mean"):
        assert len(events.Scalars(tag)) == 2 and all(math.isfinite(e.value) for e in events.Scalars(tag))
    import yaml
    saved = yaml.safe_load((run / "configs.yaml").read_text())
    assert 0 <= saved["sew_len_low"] < saved["sew_len_high"] <= 75  # the training split's percentiles, kept


def test_scmm_configs():
    from test_end_to_end import REPO
    from utils.options import build_parser, resolve
    for folder, heads in (("scmm", "sew+mcm"), ("scmm/id", "sew+mcm+id")):
        for name, dataset in (("cuhk_pedes", "CUHK-PEDES"), ("icfg_pedes", "ICFG-PEDES"), ("rstpreid", "RSTPReid")):
            cfg = resolve(build_parser("t").parse_args(["--config_file", str(REPO / f"configs/{folder}/{name}.yaml")]))
            assert (cfg.dataset_name, cfg.loss_names, cfg.batch_size, cfg.sew_len_low) == (dataset, heads, 64, -1.0)
            assert (cfg.sew_margin_low, cfg.sew_margin_high, cfg.mcm_prob, cfg.mcm_depth) == (0.05, 0.20, 0.15, 4)
            assert not cfg.global_sees_masked_caption and not cfg.MLM
