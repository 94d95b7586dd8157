"""RDE (Qin et al., CVPR 2024; code QinYang79/RDE @ b3fd396): noise injection, TAL/TRL, the
token-selection embedding, txt_aug, the consensus clean-sample division, retrieval.

Values below were obtained by running RDE's own functions (datasets/bases.py
inject_noisy_correspondence and txt_data_aug, model/objectives.py compute_TAL_per / compute_TRL_per,
model/CrossEmbeddingLayer_tse.py, processor/processor.py split_prob and get_loss) on the same inputs,
outside this repository; ours matched them (TAL/TRL within 6e-16 in float64 on 200 random batches,
the TSE layers exactly, txt_aug 300 of 300 seeds identical)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import demo_config, tiny_model_config, train_until_killed_after_epoch_one
from datasets.captions import augment_tokens
from datasets.noise import inject_noise, load_noise_file, noise_permutation
from model.build import build_model
from model.clip import ImageOutput, TextOutput
from processor.processor import metric_blocks
from model.heads.rde import (TokenEmbedding, TSEHead, clean_posterior, consensus, select_image_tokens,
                             select_text_tokens, split_by_posterior, tal_per_sample, trl_per_sample)
from solver.build import build_optimizer
from utils.errors import UserError

S_HAND = torch.tensor([[0.50, 0.47, 0.45, 0.44], [0.40, 0.52, 0.49, 0.30], [0.20, 0.35, 0.60, 0.58],
                       [0.10, 0.46, 0.41, 0.55]], dtype=torch.float64)
PIDS = torch.tensor([0, 0, 1, 2])


# ---------------------------------------------------------------- V1: noise injection
def test_noise_toy_case():
    permutation = noise_permutation(10, 0.5, seed=1)
    assert permutation.tolist() == [0, 1, 4, 3, 6, 5, 9, 7, 8, 2]  # RDE's, after np.random.seed(1)
    records = [(i // 2, i, f"img{i}", f"cap{i}") for i in range(10)]
    noisy, clean = inject_noise(records, 0.5, seed=1)
    assert [r[0] for r in noisy] == [r[0] for r in records] and [r[2] for r in noisy] == [r[2] for r in records]
    assert [r[3] for r in noisy] == ["cap0", "cap1", "cap4", "cap3", "cap6", "cap5", "cap9", "cap7", "cap8", "cap2"]
    assert clean == [True, True, False, True, False, True, False, True, True, False]  # 0: chosen, a fixed point
    assert inject_noise(records, 0.0) == (records, [True] * 10)


def test_noise_is_independent_of_the_training_seed_and_nested_across_rates():
    torch.manual_seed(123)
    np.random.seed(123)
    a = noise_permutation(1000, 0.2)
    np.random.seed(7)
    assert np.array_equal(a, noise_permutation(1000, 0.2))
    order = np.random.RandomState(1).permutation(1000)  # the first shuffle picks the noisy records
    for rate in (0.2, 0.5, 0.8):
        moved = set(np.nonzero(noise_permutation(1000, rate) != np.arange(1000))[0].tolist())
        chosen = set(order[:int(rate * 1000)].tolist())  # a prefix: higher rates add records, never swap them
        assert moved <= chosen and len(chosen) - len(moved) <= 5  # a few chosen records draw their own caption


def test_noise_files_are_validated(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, noise_permutation(20, 0.5))
    assert np.array_equal(load_noise_file(good, 20), noise_permutation(20, 0.5))
    np.save(tmp_path / "short.npy", np.arange(19))
    np.save(tmp_path / "dup.npy", np.array([0] * 20))
    with pytest.raises(UserError, match="must hold 20 integer indices"):
        load_noise_file(tmp_path / "short.npy", 20)
    with pytest.raises(UserError, match="is not a permutation of the 20 training records"):
        load_noise_file(tmp_path / "dup.npy", 20)
    with pytest.raises(UserError, match="noisy_file not found"):
        load_noise_file(tmp_path / "none.npy", 20)


def test_only_the_training_split_is_noisy(toy_root, tokenizer):
    from datasets import build_dataset
    from datasets.build import build_eval_loaders, build_train_loader
    dataset = build_dataset("CUHK-PEDES", toy_root)
    test_captions = list(dataset.test.captions)
    cfg = demo_config(toy_root, "--noisy_rate", "0.5", "--batch_size", "64", "--loss_names", "tal+tse")
    loader = build_train_loader(cfg, dataset, tokenizer, {"index", "is_clean"})
    records = loader.dataset.records
    noisy = noise_permutation(len(records), 0.5) != np.arange(len(records))
    assert 28 <= noisy.sum() <= 32 and loader.dataset.is_clean == (~noisy).tolist()  # int(0.5 x 64) chosen
    assert [r[3] != o[3] for r, o in zip(records, dataset.train)] == noisy.tolist()
    assert dataset.test.captions == test_captions and build_eval_loaders(cfg, dataset, tokenizer)
    batch = next(iter(loader))
    for index, clean in zip(batch["index"].tolist(), batch["is_clean"].tolist()):
        assert clean == (records[index][3] == dataset.train[index][3])


# ---------------------------------------------------------------- V2-V4: losses
def test_tal_by_hand():
    per_sample = tal_per_sample(S_HAND, PIDS)
    assert per_sample.tolist() == pytest.approx([0.0597916, 0.1117723, 0.0800000, 0.1405271], abs=1e-7)
    assert per_sample.sum().item() == pytest.approx(0.3920911, abs=1e-7)
    weights = torch.tensor([1.0, 1, 0, 1], dtype=torch.float64)
    assert (weights * per_sample).sum().item() == pytest.approx(0.3120911, abs=1e-7)
    assert tal_per_sample(S_HAND, PIDS, tau=0.02).sum().item() == pytest.approx(0.4007232, abs=1e-7)
    assert tal_per_sample(S_HAND, torch.arange(4)).sum().item() == pytest.approx(0.4218188, abs=1e-7)
    torch.testing.assert_close(tal_per_sample(S_HAND.t(), PIDS), per_sample)


def test_tal_gradient_by_hand():
    sims = S_HAND.clone().requires_grad_()
    tal_per_sample(sims, PIDS).sum().backward()
    for row, expected in ((0, [-0.880797, -0.153648, 0.660756, 0.339332]), (2, [0.0, 0.000653, -1.0, 1.999911])):
        torch.testing.assert_close(sims.grad[row], torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_trl_by_hand():
    assert trl_per_sample(S_HAND, PIDS).tolist() == pytest.approx([0.0535761, 0.1117625, 0.08, 0.14], abs=1e-7)


def test_losses_from_features_scale_invariance_and_single_identity():
    image = torch.tensor([[1, 0], [0.6, 0.8], [0, 1], [-0.6, 0.8]], dtype=torch.float64)
    text = torch.tensor([[0.8, 0.6], [1, 0], [0.28, 0.96], [-0.8, 0.6]], dtype=torch.float64)

    def loss(i, t, pids=PIDS):
        return tal_per_sample(F.normalize(t, dim=1) @ F.normalize(i, dim=1).t(), pids)

    assert loss(image, text).tolist() == pytest.approx([0, 0.076, 0.076, 0], abs=1e-7)
    torch.testing.assert_close(loss(3 * image, 2 * text), loss(image, text))
    leaf = image.clone().requires_grad_()
    single = loss(leaf, text, torch.zeros(4, dtype=torch.long))
    single.sum().backward()
    assert single.sum().item() == 0 and torch.isfinite(leaf.grad).all() and not leaf.grad.any()  # RDE: NaN


# ---------------------------------------------------------------- V5-V7: token selection embedding
def _identity_embedding(width=4, embed=8):
    """FC = [I; 0], MLP output zero: the embedding is the max over the selected normalised tokens."""
    layer = TokenEmbedding(width, embed).double().eval()
    with torch.no_grad():
        layer.fc.weight.zero_()
        layer.fc.weight[:width] = torch.eye(width)
        layer.fc.bias.zero_()
        layer.mlp[3].weight.zero_()
        layer.mlp[3].bias.zero_()
    return layer


def test_image_token_selection():
    tokens = torch.tensor([[-1.0, -1, -1, 9]] * 11, dtype=torch.float64)
    special = {0: [0, 0, 9, 0], 1: [0, 0, 0, 5], 2: [3, 4, 0, 0], 4: [0, 1, 0, 0], 7: [1, 1, 1, 1]}
    for position, value in special.items():
        tokens[position] = torch.tensor(value, dtype=torch.float64)
    attention = torch.tensor([[0.30, 0.05, 0.20, 0.02, 0.15, 0.08, 0.01, 0.12, 0.03, 0.04, 0.00]], dtype=torch.float64)
    image = ImageOutput(tokens[None], tokens[None, 0], attention=attention)
    selected = select_image_tokens(image, 0.3)
    assert selected.shape == (1, 3, 4)
    torch.testing.assert_close(selected[0], tokens[[2, 4, 7]])
    out = _identity_embedding()(selected)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 1.0, 0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64))


def test_text_token_selection_uses_the_eot_row_and_never_pools_padding():
    ids = torch.zeros(2, 12, dtype=torch.long)
    ids[0, :7] = torch.tensor([49406, 320, 2308, 3309, 320, 736, 49407])
    ids[1, :4] = torch.tensor([49406, 320, 2308, 49407])
    tokens = torch.tensor([[0.0, 0, 0, 8]] * 12, dtype=torch.float64).repeat(2, 1, 1)
    tokens[0, 1] = tokens[0, 2] = torch.tensor([0.0, 0, 6, 0])
    for position, value in ((3, [3, 4, 0, 0]), (4, [4, 3, 0, 0]), (5, [1, 0, 0, 0])):
        tokens[0, position] = torch.tensor(value, dtype=torch.float64)
    tokens[1, 1], tokens[1, 2] = torch.tensor([0.0, 2, 0, 0]), torch.tensor([1.0, 0, 1, 0])
    eot_rows = torch.zeros(2, 12, dtype=torch.float64)
    eot_rows[0, :7] = torch.tensor([0.30, 0.10, 0.05, 0.20, 0.15, 0.12, 0.08])
    eot_rows[1, :4] = torch.tensor([0.5, 0.2, 0.1, 0.2])
    text = TextOutput(ids, tokens, tokens[:, 0], attention=eot_rows)
    selected, lengths = select_text_tokens(text, 0.3)
    assert selected.shape == (2, 3, 4) and lengths.tolist() == [3, 2]
    torch.testing.assert_close(selected[0], tokens[0, [3, 4, 5]])
    out = _identity_embedding()(selected, lengths)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 0.8, 0, 0, 0, 0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(out[1], torch.tensor([0.707107, 1.0, 0.707107, 0, 0, 0, 0, 0], dtype=torch.float64),
                               atol=1e-6, rtol=0)  # dim 3 is 0: the gathered padding is not pooled


def test_tse_layers_and_frozen_batch_norm():
    cfg = tiny_model_config(loss_names="tal+tse", embed_dim=512, tse_embed_dim=1024)
    torch.manual_seed(0)
    model = build_model(cfg, 6)
    head = model.heads["tse"]
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in (head.image, head.text)]
    assert sizes == [1_314_304, 1_314_304]
    tokens = torch.randn(4, 57, 512)
    model.train()
    for _ in range(3):
        head.image(tokens).sum().backward()
    bn = head.image.mlp[1]
    assert not bn.training and bn.num_batches_tracked == 0 and not bn.running_mean.any() and (bn.running_var == 1).all()
    train_out = head.image(tokens)
    model.eval()
    torch.testing.assert_close(train_out, head.image(tokens))
    head.bn_frozen = False
    model.train()
    moving = head.image(tokens)
    model.eval()
    assert not torch.allclose(moving, head.image(tokens))  # batch statistics once unfrozen


# ---------------------------------------------------------------- V8: txt_aug
def test_txt_aug_rates_and_invariants(tokenizer):
    import random
    rng = random.Random(0)
    ids = torch.tensor([49406] + list(range(300, 316)) + [49407] + [0] * 59)
    counts = {"mask": 0, "deleted": 0, "random": 0}
    for _ in range(20_000):
        out = augment_tokens(ids, tokenizer, 0.2, 0.6, 0.2, rng)
        assert len(out) == 77 and out[0] == 49406 and int(out.argmax()) == int((out != 0).sum()) - 1
        words = out[1:int(out.argmax())]
        assert ((words > 0) & (words < 49406)).all()  # never 0, SOT or EOT
        counts["mask"] += int((words == 49405).sum())
        counts["deleted"] += 16 - len(words)
        counts["random"] += int(((words != 49405) & ((words < 300) | (words >= 316))).sum())
    total = 16 * 20_000
    assert counts["mask"] / total == pytest.approx(0.12, abs=0.003)
    assert counts["deleted"] / total == pytest.approx(0.04, abs=0.002)
    assert counts["random"] / total == pytest.approx(0.04, abs=0.002)


# ---------------------------------------------------------------- V9: the division
CASE1_B = np.array([0.05, 0.08, 0.10, 0.12, 0.07, 0.09, 0.80, 0.85, 0.90, 0.11, 0.75, 0.06])
CASE1_T = np.array([0.30, 0.32, 0.35, 0.90, 0.31, 0.33, 0.95, 0.34, 1.00, 0.36, 0.92, 0.29])


@pytest.mark.parametrize("gmm", ["fast", "full"])
@pytest.mark.parametrize("seed", range(5))
def test_division_of_well_separated_losses(gmm, seed):
    b = split_by_posterior(clean_posterior(CASE1_B, gmm, seed))
    t = split_by_posterior(clean_posterior(CASE1_T, gmm, seed))
    assert b.tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1]
    assert t.tolist() == [1, 1, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1]
    label = consensus(np.stack([b, t]), "flip", torch.Generator().manual_seed(0))  # coins (0, 1) for 3 and 7
    assert label.tolist() == [1, 1, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1]
    assert consensus(np.stack([b, t]), "drop", torch.Generator())[[3, 7]].tolist() == [0, 0]
    assert consensus(np.stack([b, t]), "keep", torch.Generator())[[3, 7]].tolist() == [1, 1]


def test_division_pins_the_gmm_settings_and_seed():
    """The init-sensitive case (scikit-learn's GaussianMixture, random_state 0)."""
    losses = np.array([0.02, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.20, 0.26, 0.30, 0.34, 0.40, 0.50, 0.55, 0.60, 0.62])
    fast, full = clean_posterior(losses, "fast", 0), clean_posterior(losses, "full", 0)
    assert split_by_posterior(fast).sum() == 10 and fast[9] == pytest.approx(0.5708, abs=1e-3)
    assert split_by_posterior(full).sum() == 7 and full[6] == pytest.approx(0.8019, abs=1e-3)


def test_division_fallback_and_strict_threshold():
    assert split_by_posterior(np.array([0.9, 0.8, 0.7, 0.95, 0.6])).tolist() == [1, 1, 1, 1, 0]
    assert (split_by_posterior(np.linspace(0.51, 0.99, 200)) == 0).sum() == 3  # int(200 / 100) + 1
    assert split_by_posterior(np.array([0.9, 0.5, 0.2, 0.51])).tolist() == [1, 0, 0, 1]


# ---------------------------------------------------------------- V10: assembly and optimiser
def _rde_batch():
    from ddp_reference import fixed_batch
    batch = fixed_batch()
    batch["caption_ids"] = F.pad(batch["caption_ids"], (0, 61))
    return batch


def test_weights_only_remove_anchor_terms():
    cfg = tiny_model_config(loss_names="tal")
    torch.manual_seed(0)
    model = build_model(cfg, 6)
    ccd, batch = model.heads["ccd"], _rde_batch()
    ccd.weights = torch.tensor([1.0, 1, 0, 1, 1, 1, 1, 1])
    out = model.encode(batch)
    image = out.image.global_feature.detach().requires_grad_()
    text = out.text.global_feature.detach().requires_grad_()
    out.image.global_feature, out.text.global_feature = image, text
    loss = model.heads["tal"](batch, out, model.encoder)["tal_loss"]
    sims = F.normalize(text, dim=1) @ F.normalize(image, dim=1).t()
    expected = (ccd.weights * tal_per_sample(sims, batch["pids"])).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert image.grad[2].abs().sum() > 0  # a weight-0 sample still serves as a negative


def test_optimizer_groups():
    cfg = tiny_model_config(loss_names="tal+tse", lr=1e-5, bias_lr_factor=2.0, weight_decay=4e-5, weight_decay_bias=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, 6)
    groups = {id(p): g for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    for name, expected in (("heads.tse.image.fc.weight", (1e-3, 4e-5)), ("heads.tse.image.fc.bias", (1e-3, 0.0)),
                           ("heads.tse.text.mlp.1.weight", (1e-3, 4e-5)), ("heads.tse.text.mlp.1.bias", (1e-3, 0.0)),
                           ("encoder.visual.conv1.weight", (1e-5, 4e-5)), ("encoder.ln_final.bias", (2e-5, 0.0))):
        group = groups[id(params[name])]
        assert (group["lr"], group["weight_decay"]) == pytest.approx(expected), name


# ---------------------------------------------------------------- V11: retrieval
def test_retrieval_averages_the_two_cosines(toy_root):
    from datasets import build_dataset
    from datasets.build import build_eval_loaders
    from processor.evaluation import Evaluator
    from utils.simple_tokenizer import SimpleTokenizer
    cfg = demo_config(toy_root, "--loss_names", "tal+tse", "--tse_embed_dim", "32")
    dataset = build_dataset("CUHK-PEDES", toy_root)
    torch.manual_seed(0)
    model = build_model(cfg, dataset.num_classes)
    assert model.retrieval.weights == {"global": 0.5, "tse": 0.5}
    calls = []
    model.encoder.visual.transformer.register_forward_hook(lambda *a: calls.append(1))
    evaluation = Evaluator(*build_eval_loaders(cfg, dataset, SimpleTokenizer())).eval(model, torch.device("cpu"))
    assert len(calls) == 1  # global and TSE features from one image pass (one batch)
    assert list(evaluation.results) == ["t2i", "t2i_global", "t2i_tse", "i2t"]
    text, image = evaluation.text, evaluation.image
    mean = (text.sets["global"] @ image.sets["global"].t() + text.sets["tse"] @ image.sets["tse"].t()) / 2
    torch.testing.assert_close(text.combined @ image.combined.t(), mean, atol=1e-6, rtol=1e-6)


def _unit_features(cosines: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A query e0 and one unit gallery vector per cosine: c e0 + sqrt(1 - c^2) e_(j+1)."""
    gallery = torch.zeros(len(cosines), len(cosines) + 1, dtype=torch.float64)
    for j, c in enumerate(cosines):
        gallery[j, 0], gallery[j, j + 1] = c, math.sqrt(1 - c * c)
    return torch.eye(1, len(cosines) + 1, dtype=torch.float64), gallery


def test_the_averaged_cosines_rank_the_toy_query():
    """Spec V11: BGE misses (g0 first), TSE hits, their mean ranks the match g1 first."""
    from model.retrieval import RetrievalDefinition
    from utils.metrics import retrieval_metrics
    combine = RetrievalDefinition({"tse": TSEHead(4, 8)}).combine
    pids = torch.tensor([2]), torch.tensor([1, 2, 3])
    (qb, gb), (qt, gt) = _unit_features([0.9, 0.8, 0.1]), _unit_features([0.2, 0.6, 0.0])
    assert retrieval_metrics(qb, gb, *pids)["R1"] == 0 and retrieval_metrics(qt, gt, *pids)["R1"] == 100
    query, gallery = combine({"global": qb, "tse": qt}), combine({"global": gb, "tse": gt})
    torch.testing.assert_close(query @ gallery.t(), torch.tensor([[0.55, 0.70, 0.05]], dtype=torch.float64))
    assert retrieval_metrics(query, gallery, *pids)["R1"] == 100


# ---------------------------------------------------------------- training
def test_noisy_toy_run_logs_the_division_and_resumes_exactly(toy_root, tmp_path, monkeypatch):
    import train as train_entry
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_end_to_end import REPO, TINY
    args = ["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root), "--loss_names",
            "tal+tse", "--tse_embed_dim", "64", "--noisy_rate", "0.5", "--num_epoch", "3", "--eval_period", "1",
            "--txt_aug_prob", "0.2"]
    straight = tmp_path / "straight"
    train_entry.main([*args, "--output_dir", str(straight)])
    events = EventAccumulator(str(straight))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/ccd_noisy_precision", "train/ccd_noisy_recall", "train/tal_loss", "train/tse_loss"} <= set(tags)
    for tag in ("train/tal_loss", "train/tse_loss", "train/ccd_noisy_recall"):
        assert all(math.isfinite(e.value) for e in events.Scalars(tag))
    assert "1/2" not in json.dumps(events.Scalars("train/ccd_noisy_recall")[0].value)  # a number
    log = (straight / "train_log.txt").read_text()
    assert log.count("division over the branches tal, tse") == 3 and log.count("GMM (full): clean mean") == 6
    interrupted = tmp_path / "interrupted"
    train_until_killed_after_epoch_one(monkeypatch, [*args, "--output_dir", str(interrupted)])
    assert torch.load(interrupted / "last.pth", weights_only=False)["heads"]["ccd"]["weights"] is not None
    train_entry.main([*args, "--output_dir", str(interrupted), "--resume"])
    a = torch.load(straight / "last.pth", weights_only=False)
    b = torch.load(interrupted / "last.pth", weights_only=False)
    assert torch.equal(a["heads"]["ccd"]["weights"], b["heads"]["ccd"]["weights"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    results = json.loads((straight / "results.json").read_text())
    assert list(metric_blocks(results)) == ["t2i", "t2i_global", "t2i_tse", "i2t"]


def test_rde_configs():
    from test_end_to_end import REPO
    from utils.options import build_parser, resolve
    for name, dataset in (("cuhk_pedes", "CUHK-PEDES"), ("icfg_pedes", "ICFG-PEDES"), ("rstpreid", "RSTPReid")):
        cfg = resolve(build_parser("t").parse_args(["--config_file", str(REPO / f"configs/rde/{name}.yaml")]))
        assert (cfg.dataset_name, cfg.loss_names, cfg.batch_size, cfg.val_dataset) == (dataset, "tal+tse", 64, "test")
        tse = (cfg.tal_tau, cfg.tal_margin, cfg.tse_ratio, cfg.tse_embed_dim, cfg.tse_lr)
        assert tse == (0.015, 0.1, 0.3, 1024, 1e-3)
        assert cfg.tse_bn_frozen and cfg.ccd and cfg.img_aug and cfg.txt_aug_prob == 0.2
        assert (cfg.noisy_rate, cfg.noise_seed, cfg.optimizer_eps, cfg.erase_value) == (0.0, 1, 1e-3, "clip_mean")


def test_run_script_takes_the_noise_rate():
    import os
    import subprocess

    from test_end_to_end import REPO
    run = [["bash", str(REPO / "run_scripts/rde.sh"), *args] for args in (("0.2", "--seed", "3"), ())]
    out = subprocess.run(run[0], env={**os.environ, "PY": "echo"}, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [f"train.py --config_file configs/rde/{name}.yaml --noisy_rate 0.2 "
                                       "--name rde_n0.2 --seed 3" for name in ("cuhk_pedes", "icfg_pedes", "rstpreid")]
    missing = subprocess.run(run[1], env={**os.environ, "PY": "echo"}, capture_output=True, text=True)
    assert missing.returncode != 0 and "usage: rde.sh NOISY_RATE" in missing.stderr


def test_the_encoder_pass_carries_the_selection_rows():
    """With ``tse`` the one encoder pass also returns the last block's CLS / EOT attention rows; the
    features are those of the plain pass."""
    cfg = tiny_model_config(loss_names="tal+tse")
    torch.manual_seed(0)
    model = build_model(cfg, 6).eval()
    batch = _rde_batch()
    out = model.encode(batch)
    plain_image = model.encoder.image_output(batch["images"])
    plain_text = model.encoder.text_output(batch["caption_ids"])
    assert plain_image.attention is None and plain_text.attention is None
    torch.testing.assert_close(out.image.tokens, plain_image.tokens, rtol=0, atol=0)
    torch.testing.assert_close(out.text.tokens, plain_text.tokens, rtol=0, atol=0)
    assert out.image.attention.shape == out.image.tokens.shape[:2]
    torch.testing.assert_close(out.image.attention.sum(1), torch.ones(8))
    eot = batch["caption_ids"].argmax(dim=1)
    assert (out.text.attention[:, 10:] == 0).all() and (out.text.attention[torch.arange(8), eot] > 0).all()


def test_the_first_division_leaves_the_global_rng_alone():
    """Importing scikit-learn draws from Python's global RNG (txt_aug's); a run must not depend on
    whether another part of the process imported it first."""
    import subprocess
    import sys

    from test_end_to_end import REPO
    code = ("import random, numpy as np\nfrom model.heads.rde import clean_posterior\nrandom.seed(0)\n"
            "state = random.getstate()\nclean_posterior(np.linspace(0, 1, 50), 'fast', 0)\n"
            "assert random.getstate() == state\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-500:]
