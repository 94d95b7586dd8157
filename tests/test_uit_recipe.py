"""UIT recipe pieces outside the heads: idrannum sampler, caption pruning/corruption in the dataset,
parameter groups and schedule of SEN's released recipe (Delong-liu-bupt/SEN @ 3d887c1, run_SEN.sh,
solver/build.py), the shipped configs."""
from __future__ import annotations

import os
import random
import subprocess
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datasets import build_dataset
from datasets.build import build_train_loader
from datasets.captions import CaptionAugmentation, MaskingConfig, encode_with_key_words
from datasets.sampler import RandomIdNumSampler
from datasets.text_prune import prune_caption
from model.build import build_model
from solver.build import build_lr_scheduler, build_optimizer
from utils.options import build_parser, resolve
from utils.simple_tokenizer import tokenize

from conftest import tiny_model_config

REPO = Path(__file__).resolve().parents[1]


def uit_config(**overrides) -> SimpleNamespace:
    cfg = resolve(build_parser("t").parse_args(["--config_file", str(REPO / "configs/uit/cuhk_pedes.yaml")]))
    return SimpleNamespace(**{**vars(cfg), **overrides})


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, dataset", [("cuhk_pedes", "CUHK-PEDES"), ("icfg_pedes", "ICFG-PEDES"),
                                           ("rstpreid", "RSTPReid")])
def test_uit_configs_hold_the_released_recipe(name, dataset):
    cfg = resolve(build_parser("t").parse_args(["--config_file", str(REPO / f"configs/uit/{name}.yaml")]))
    assert cfg.dataset_name == dataset and cfg.loss_names == "sdm+id+cmt+tir"
    assert (cfg.batch_size, cfg.num_epoch, cfg.warmup_epochs, cfg.seed) == (128, 60, 5, 42)
    assert (cfg.cmt_loss_weight, cfg.tir_loss_weight, cfg.cmt_margin, cfg.tir_mask_ratio) == (10, 10, 0.05, 0.7)
    assert (cfg.sampler, cfg.num_instance, cfg.text_prune_prob) == ("idrannum", 2, 0.2)
    assert cfg.text_mask_corruption and cfg.tir_gray and not cfg.tir_mask_exact and not cfg.tir_residual
    assert not cfg.MLM and cfg.img_aug and cfg.erase_value == "clip_mean"
    assert (cfg.optimizer, cfg.optimizer_eps, cfg.lr, cfg.weight_decay) == ("Adam", 1e-3, 1e-5, 4e-5)


@pytest.mark.parametrize("method", ["irra", "uit", "aptm", "lgur", "scmm"])
def test_run_script_launches_the_three_configs(method):
    """The script runs train.py once per benchmark config (PY=echo prints the commands)."""
    out = subprocess.run(["bash", str(REPO / f"run_scripts/{method}.sh"), "--seed", "3"],
                         env={**os.environ, "PY": "echo"}, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == [f"train.py --config_file configs/{method}/{name}.yaml --seed 3"
                   for name in ("cuhk_pedes", "icfg_pedes", "rstpreid")]


# ----------------------------------------------------------------------------------------------
# Parameter groups by role and the schedule (SEN solver/, run_SEN.sh)
# ----------------------------------------------------------------------------------------------
def expected_lr_and_decay(name: str) -> tuple[float, float]:
    """SEN's solver/build.py name-substring rules, written out per parameter name of our model."""
    bias = name.endswith("bias")
    if name.startswith("heads.id.classifier"):
        return 5e-5, 0.0 if bias else 4e-5
    if name.startswith(("heads.tir.cross_attn.", "heads.tir.decoder.")):
        return (2e-5, 0.0) if bias else (5e-5, 4e-5)
    return (2e-5, 0.0) if bias else (1e-5, 4e-5)


def test_parameter_groups_follow_sen_rules():
    cfg = uit_config(**{k: v for k, v in vars(tiny_model_config()).items()
                        if k in ("pretrain_choice", "img_size", "vision_patch_size", "stride_size", "vision_width",
                                 "vision_layers", "text_width", "text_layers", "embed_dim", "text_length")})
    model = build_model(cfg, num_classes=5)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["eps"] == 1e-3
    group_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(group_of) == len(names)
    for name, param in names.items():
        lr, wd = group_of[id(param)]
        assert (lr, wd) == pytest.approx(expected_lr_and_decay(name)), name
    # named cases: decoder blocks and cross-attention get 5e-5 (biases 2e-5); mask_token, decoder_embed,
    # decoder_pred and norm_7 keep the base lr, as their SEN names contain no "cross"
    for name, lr in [("heads.tir.mask_token", 1e-5), ("heads.tir.decoder_embed.weight", 1e-5),
                     ("heads.tir.decoder_pred.weight", 1e-5), ("heads.tir.norm_7.weight", 1e-5),
                     ("heads.tir.decoder.resblocks.0.ln_1.weight", 5e-5),
                     ("heads.tir.cross_attn.in_proj_weight", 5e-5), ("heads.tir.cross_attn.in_proj_bias", 2e-5)]:
        assert group_of[id(names[name])][0] == pytest.approx(lr), name


def test_schedule_factors():
    cfg = uit_config()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_lr_scheduler(cfg, optimizer)
    factors = []
    for _ in range(60):
        factors.append(optimizer.param_groups[0]["lr"] / cfg.lr)
        optimizer.step()
        scheduler.step()
    assert factors[:6] == pytest.approx([0.1, 0.28, 0.46, 0.64, 0.82, 1.0])
    assert factors[59] == pytest.approx(0.00082, abs=1e-5)


# ----------------------------------------------------------------------------------------------
# idrannum sampler
# ----------------------------------------------------------------------------------------------
def test_idrannum_draws_one_or_two_per_identity():
    """One sample per identity: an identity drawing k = 2 is resampled to the same index twice."""
    pids = list(range(1000))
    order = list(RandomIdNumSampler(pids, batch_size=128, num_instances=2, seed=0))
    counts = Counter(order)
    assert set(counts.values()) == {1, 2}
    assert len(counts) == 1000 // 64 * 64  # groups of P = 64 identities while 64 remain
    doubles = sum(1 for n in counts.values() if n == 2)
    assert abs(doubles / len(counts) - 0.5) < 0.06  # k uniform on {1, 2}
    for index, n in counts.items():
        if n == 2:
            position = order.index(index)
            assert order[position + 1] == index  # a chunk is consecutive


def test_idrannum_batches_mix_pairs_and_singles():
    """CUHK-like index (3 captions per identity): about half the samples of a batch have a
    same-identity partner (simulated for SEN's idrannum sampler), against almost none for a random
    shuffle."""
    pids = [p for p in range(3000) for _ in range(3)]
    sampler = RandomIdNumSampler(pids, batch_size=128, num_instances=2, seed=1)
    order = list(sampler)
    assert len(sampler) == len(order)
    assert len(set(order)) == len(order)  # without replacement: every identity has >= 2 samples
    partnered = []
    for b in range(0, len(order) - 127, 128):
        batch = Counter(pids[i] for i in order[b:b + 128])
        partnered.append(sum(n for n in batch.values() if n > 1) / 128)
    assert 0.4 < sum(partnered) / len(partnered) < 0.6


def test_idrannum_is_seeded_per_epoch_and_split_across_ranks():
    pids = [p for p in range(300) for _ in range(1 + p % 4)]
    a, b = RandomIdNumSampler(pids, 32, 2, seed=3), RandomIdNumSampler(pids, 32, 2, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    full = list(RandomIdNumSampler(pids, 32, 2, seed=5))
    ranks = [RandomIdNumSampler(pids, 32, 2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    parts = [list(r) for r in ranks]
    assert len(parts[0]) == len(parts[1]) == len(ranks[0])
    rebuilt = []
    for b in range(0, len(full), 32):
        size = min(32, len(full) - b) // 2
        rebuilt += parts[0][b // 2:b // 2 + size] + parts[1][b // 2:b // 2 + size]
    kept = [i for b in range(0, len(full), 32) for i in full[b:b + min(32, len(full) - b) // 2 * 2]]
    assert rebuilt == kept  # each rank takes its half of every global batch


def test_train_loader_uses_idrannum(toy_benchmarks, tokenizer):
    dataset = build_dataset("CUHK-PEDES", str(toy_benchmarks.root))
    cfg = tiny_model_config(sampler="idrannum", num_instance=2, batch_size=4, num_workers=0)
    loader = build_train_loader(cfg, dataset, tokenizer, set())
    assert isinstance(loader.sampler, RandomIdNumSampler)
    assert sum(len(batch["pids"]) for batch in loader) == len(loader.sampler)


# ----------------------------------------------------------------------------------------------
# Pruning and corruption as the dataset applies them (SEN datasets/bases.py ImageTextMAEDataset)
# ----------------------------------------------------------------------------------------------
CAPTION = "A woman with long black hair is wearing a white shirt and blue jeans."


def test_prune_probability(tokenizer):
    augment = CaptionAugmentation(prune_prob=0.2)
    rng = random.Random(0)
    pruned_ids = tokenize(prune_caption(CAPTION), tokenizer)
    pruned = sum(torch.equal(augment(CAPTION, tokenizer, 77, rng), pruned_ids) for _ in range(10_000))
    assert abs(pruned - 2000) < 120


def test_corruption_rates(tokenizer):
    """Key-word pieces selected with 0.3, others 0.05; selected: 80% mask, 10% random, 10% kept."""
    augment = CaptionAugmentation(corruption=MaskingConfig(1.0, 0.8, 0.1))
    clean, key = encode_with_key_words(CAPTION, tokenizer, 77)
    assert torch.equal(clean, tokenize(CAPTION, tokenizer))
    key = torch.tensor(key)
    content = (clean > 0) & (clean < tokenizer.mask_id)
    other = content & ~key
    assert key.sum() == 8 and other.sum() == 7  # woman long black hair white shirt blue jeans; the rest
    rng = random.Random(1)
    draws = torch.stack([augment(CAPTION, tokenizer, 77, rng) for _ in range(20_000)])
    masked = draws == tokenizer.mask_id
    replaced = (draws != clean) & ~masked
    other[1] = False  # position 1 ("a") is also masked whenever nothing was selected
    key_rate = masked[:, key].float().mean().item()
    other_rate = masked[:, other].float().mean().item()
    assert key_rate == pytest.approx(0.3 * 0.8, abs=0.01)
    assert other_rate == pytest.approx(0.05 * 0.8, abs=0.004)
    assert replaced[:, key].float().mean().item() == pytest.approx(0.3 * 0.1, abs=0.004)
    assert replaced[:, other].float().mean().item() == pytest.approx(0.05 * 0.1, abs=0.002)
    assert not (draws[:, ~content] != clean[~content]).any()  # SOT, EOT and padding untouched
    assert (draws != clean).any(dim=1).float().mean() > 0.9  # SEN: ~99% of captions differ


def test_corruption_forces_one_mask_when_nothing_is_selected(tokenizer):
    augment = CaptionAugmentation(corruption=MaskingConfig(1.0, 0.8, 0.1), key_prob=0.0, other_prob=0.0)
    clean = tokenize(CAPTION, tokenizer)
    ids = augment(CAPTION, tokenizer, 77, random.Random(0))
    assert ids[1] == tokenizer.mask_id and torch.equal(ids[2:], clean[2:])


def test_pruned_caption_reaches_every_head(toy_benchmarks, tokenizer):
    """With prune probability 1 the only caption in the batch is the pruned one (SDM, ID, CMT and
    the TIR cross-attention all read ``caption_ids``)."""
    dataset = build_dataset("CUHK-PEDES", str(toy_benchmarks.root))
    cfg = tiny_model_config(text_prune_prob=1.0, batch_size=4, num_workers=0)
    loader = build_train_loader(cfg, dataset, tokenizer, set())
    batch = next(iter(loader))
    assert set(batch) == {"replaced", "pids", "image_ids", "images", "caption_ids"}
    sample = loader.dataset[0]
    caption = dataset.train[0][3]
    assert torch.equal(sample["caption_ids"], tokenize(prune_caption(caption), tokenizer, 77))
    assert not torch.equal(sample["caption_ids"], tokenize(caption, tokenizer, 77))
