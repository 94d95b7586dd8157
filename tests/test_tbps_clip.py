"""TBPS-CLIP (Cao et al., AAAI 2024; Flame-Chasers/TBPS-CLIP @ ba090bc) against the checks of
``shared/methods/tbps_clip.md`` ("How to verify", V1-V11): hand-computed losses and gradients whose
upstream values the spec records, the logit scale's straight-through clamp, dropout placement, the
augmentation pool's draw statistics, the text pipeline, the per-iteration schedule and the soft-label
ramp, optimizer groups and parameter counts, and a 2-epoch toy run of the full recipe."""
from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import train as train_entry
from datasets import build_dataset
from datasets.captions import CaptionAugmentation, clean_dataset_captions, pre_caption, random_deletion
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, AugmentationPool, build_transforms
from ddp_reference import fixed_batch, tiny_config
from model.build import build_model
from model.clip import CLIPConfig, CLIPEncoder
from model.heads.tbps_common import LogitScaleHead
from model.objectives import cyclic_itc, identity_targets, reversed_itc, simclr_loss, soft_label_itc
from solver.build import build_lr_scheduler, build_optimizer
from test_end_to_end import REPO, TINY
from utils.errors import ConfigError
from utils.options import build_parser, resolve

D = torch.float64
PIDS = torch.tensor([0, 0, 1, 1])
U = torch.tensor([[1, 0], [0.6, 0.8], [0, 1], [-0.6, 0.8]], dtype=D)   # V7 images
V = torch.tensor([[0.6, 0.8], [1, 0], [0.28, 0.96], [-0.8, 0.6]], dtype=D)  # V7 texts
S10 = torch.tensor(10.0, dtype=D)


# ---------------------------------------------------------------- V7 / V8 / V9: losses by hand
def test_nitc_on_the_hand_batch():
    q = identity_targets(PIDS).to(D)
    assert soft_label_itc(U, V, U, V, q, 0.0, S10).item() == pytest.approx(2.0842154063, abs=1e-9)
    assert soft_label_itc(U, V, U, V, q, 0.5, S10).item() == pytest.approx(1.2231696985, abs=1e-9)
    diagonal = torch.eye(4, dtype=D)  # plain ITC: identity targets forgotten
    assert soft_label_itc(U, V, U, V, diagonal, 0.0, S10).item() == pytest.approx(2.184215, abs=1e-6)
    view = U.clone()
    view[0] = torch.tensor([0.8, 0.6])
    mvs = soft_label_itc(view, V, view, V, q, 0.0, S10)
    assert mvs.item() == pytest.approx(1.706966, abs=1e-6)
    # upstream forward builds Q in float32: agreement to 6e-9 (the spec: atol 1e-6)
    assert ((soft_label_itc(U, V, U, V, q, 0.0, S10) + mvs) / 2).item() == pytest.approx(1.8955909347, abs=1e-8)


def test_ritc_and_citc_on_the_hand_batch():
    q = identity_targets(PIDS)  # float32, as upstream builds it
    assert reversed_itc(U, V, q, S10, 0.01).item() == pytest.approx(0.8318325543, abs=1e-6)
    assert reversed_itc(U, V, q.to(D), S10, 1e-8).item() == pytest.approx(2.678321, abs=1e-6)  # SDM's eps: wrong
    assert cyclic_itc(U, V).item() == pytest.approx(0.173328, abs=1e-6)
    assert 0.1 * cyclic_itc(U, V).item() == pytest.approx(0.0173328, abs=1e-7)
    assert cyclic_itc(U, V, 1.0, 0.0).item() == pytest.approx(0.3592, abs=1e-9)
    assert cyclic_itc(U, V, 0.0, 1.0).item() == pytest.approx(0.334112, abs=1e-9)
    # R-ITC can be negative: its minimum, P = (Q + eps) / (1 + N eps), is -log(1 + N eps) (uniform Q: P uniform)
    uniform = torch.full((4, 4), 0.25, dtype=D)
    assert reversed_itc(U, V, uniform, torch.tensor(0.0, dtype=D), 0.01).item() == pytest.approx(-math.log(1.04))


def test_the_soft_label_halves_the_gradient():
    q = identity_targets(PIDS).to(D)
    grads = []
    for alpha in (0.0, 0.5):
        image = U.clone().requires_grad_()
        soft_label_itc(image, V, image.detach(), V, q, alpha, S10).backward()
        grads.append(image.grad[0])
    assert grads[0].tolist() == pytest.approx([0.479931, -0.964545], abs=1e-6)
    assert grads[1].tolist() == pytest.approx([0.239965, -0.482273], abs=1e-6)
    assert torch.allclose(grads[1], grads[0] / 2, rtol=1e-9)


def test_ssi_on_the_hand_views():
    z_a = torch.tensor([[1, 0], [0, 1], [0.6, 0.8]], dtype=D)
    z_b = torch.tensor([[0.8, 0.6], [0, 1], [-0.6, 0.8]], dtype=D)
    assert simclr_loss(z_a, z_b, 0.1).item() == pytest.approx(2.5865038912, abs=1e-9)
    row0 = math.log(math.exp(8) + 1 + math.exp(-6) + 1 + math.exp(6)) - 8
    assert row0 == pytest.approx(0.127520, abs=1e-6)
    separated = torch.eye(3, dtype=D)
    assert simclr_loss(separated, separated, 0.1).item() < 1e-3 < simclr_loss(z_a, z_b, 0.1).item()


# ---------------------------------------------------------------- V2: the logit scale
def test_the_logit_scale_is_clamped_in_value_only():
    head = LogitScaleHead(init=200.0)
    assert head.value().item() == pytest.approx(100.0)
    (3 * head.value()).backward()
    assert head.theta.grad.item() == pytest.approx(600.0, rel=1e-5)  # a torch.clamp would give 0
    head = LogitScaleHead(init=50.0)
    (3 * head.value()).backward()
    assert head.value().item() == pytest.approx(50.0) and head.theta.grad.item() == pytest.approx(150.0, rel=1e-5)


def test_the_logit_scale_starts_from_the_checkpoint(openai_checkpoint):
    path, state = openai_checkpoint(fmt="state_dict")
    cfg = tiny_config("nitc+ritc")
    cfg.pretrain_choice, cfg.img_size, cfg.stride_size, cfg.text_length = str(path), [48, 24], 16, 77
    model = build_model(cfg, num_classes=4)
    assert model.heads["logit_scale"].theta.item() == pytest.approx(4.6052)  # OpenAI: ln 100
    assert model.heads["logit_scale"].value().item() == pytest.approx(100.0, abs=1e-2)
    assert LogitScaleHead().value().item() == pytest.approx(1 / 0.07)  # without a checkpoint: CLIP's init


# ---------------------------------------------------------------- V3: dropout placement
def test_text_attention_dropout_only_in_training():
    encoder = CLIPEncoder(CLIPConfig(embed_dim=32, vision_width=64, vision_layers=1, vision_patch_size=8,
                                     image_size=(32, 16), stride_size=8, text_width=64, text_layers=2,
                                     context_length=16))
    encoder.set_text_attn_dropout(0.3)
    ids, images = fixed_batch()["caption_ids"], fixed_batch()["images"]
    encoder.train()
    assert not torch.equal(encoder.encode_text(ids), encoder.encode_text(ids))
    assert torch.equal(encoder.encode_image(images), encoder.encode_image(images))
    encoder.eval()
    assert torch.equal(encoder.encode_text(ids), encoder.encode_text(ids))


def test_the_soft_text_pass_is_a_second_draw_only_with_dropout():
    cfg = tiny_config("nitc")
    for dropout in (0.0, 0.3):
        cfg.text_attn_dropout = dropout
        model = build_model(cfg, num_classes=6).train()
        batch = fixed_batch()
        out = model.encode(batch)
        from model.heads.tbps_common import soft_text
        soft = soft_text(batch, out, model.encoder)
        first = F.normalize(out.text.global_feature, dim=-1)
        assert torch.equal(soft, first.detach()) == (dropout == 0)
        assert soft_text(batch, out, model.encoder) is soft  # once per step, shared by nitc and mvsi


# ---------------------------------------------------------------- V4: the augmentation pool
def test_the_pool_draws_two_ops_uniformly_with_replacement():
    pool = AugmentationPool((32, 16), 2)
    torch.manual_seed(0)
    pairs = [tuple(pool.draw()) for _ in range(36000)]
    assert sum(a == b for a, b in pairs) / len(pairs) == pytest.approx(1 / 6, abs=0.006)
    picks = Counter(op for pair in pairs for op in pair)
    assert all(abs(n / 72000 - 1 / 6) < 0.006 for n in picks.values()) and len(picks) == 6
    ordered = Counter(pairs)
    assert len(ordered) == 36 and all(abs(n / 36000 - 1 / 36) < 0.003 for n in ordered.values())


def test_pool_erasing_is_black_before_imagenet_normalisation():
    from PIL import Image
    transform = build_transforms((32, 16), True, normalization="imagenet", pool=2)
    pool = transform.transforms[2]
    pool.ops[5].p = 1.0  # erase for sure
    pool.draw = lambda: [4, 5]  # flip, then erase
    image = Image.new("RGB", (16, 32), (200, 150, 100))
    out = transform(image)
    black = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    erased = torch.isclose(out, black[:, None, None], atol=1e-6).all(0)
    assert erased.sum() > 0.09 * 32 * 16 and black.tolist() == pytest.approx([-2.117904, -2.035714, -1.804444], abs=1e-6)
    test = build_transforms((32, 16), False, normalization="imagenet", test_interpolation="bicubic")
    assert torch.equal(test(image), test(image)) and test(image).shape == (3, 32, 16)
    expected = (torch.tensor([200, 150, 100]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(test(image)[:, 10, 5], expected, atol=1e-6)


# ---------------------------------------------------------------- V5 / V11: text
def test_pre_caption():
    assert pre_caption("A woman wearing a red shirt (and) black pants.") == "a woman wearing a red shirt and black pants"
    assert pre_caption("Test: one.") == "test one"
    assert pre_caption(" ".join(f"w{i}" for i in range(80))) == " ".join(f"w{i}" for i in range(77))


def test_back_translation_and_random_deletion():
    augment = CaptionAugmentation(back_translation_prob=0.1)
    rng = random.Random(0)
    replaced = sum(augment.text("a man", rng, "un homme") == "un homme" for _ in range(100_000))
    assert replaced == pytest.approx(10_000, abs=300)
    assert all(augment.text("a man", rng, "") == "a man" for _ in range(2000))  # none: the caption stays
    rng = random.Random(1)
    words = " ".join(["w"] * 1000)
    kept = sum(len(random_deletion(words, 0.05, rng).split()) for _ in range(200))
    assert kept / 200_000 == pytest.approx(0.95, abs=0.002)
    assert all(random_deletion("a b c", 1.0, rng) in ("a", "b", "c") for _ in range(50))
    assert random_deletion("alone", 0.9, rng) == "alone"  # a string, unchanged (upstream: a list, then a crash)


def test_cleaning_reaches_training_captions_and_test_queries(toy_root, tokenizer):
    dataset = build_dataset("CUHK-PEDES", toy_root)
    dataset.test.captions[0] = "A man in a red shirt."
    dataset.back_translations[0] = "Un homme (rouge)."
    clean_dataset_captions(dataset, 77)
    assert dataset.test.captions[0] == "a man in a red shirt"
    assert 269 not in tokenizer.encode(dataset.test.captions[0])  # "." gone from the query
    assert dataset.back_translations[0] == "un homme rouge"
    assert all(c == pre_caption(c) for *_, c in dataset.train)


def test_back_translation_needs_translations(toy_root, tmp_path, capsys):
    from utils.errors import run_cli
    args = ["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root),
            "--output_dir", str(tmp_path / "run"), "--loss_names", "nitc", "--back_translation_prob", "0.1"]
    assert run_cli(train_entry.main, args) == 1
    assert "back_translation_prob 0.1 but no training caption of CUHK-PEDES has a back-translation" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- V6: schedule and soft-label ramp
def test_the_per_iteration_schedule_matches_upstream():
    cfg = resolve(build_parser("t").parse_args(["--config_file", str(REPO / "configs/tbps_clip/cuhk_pedes.yaml")]))
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_lr_scheduler(cfg, optimizer, steps_per_epoch=212)
    lrs = [scheduler.lr_at(1e-4, k) for k in range(1060)]
    expected = {0: 1e-6, 1: 1.4691943e-6, 211: 1e-4, 212: 1e-4, 213: 9.9999674e-5, 636: 5.25e-5, 1059: 5.0003260e-6}
    for k, value in expected.items():
        assert lrs[k] == pytest.approx(value, rel=1e-7), k
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)  # the first step's lr is set before it


def test_the_soft_label_ratio_ramps_over_the_first_epoch():
    model = build_model(tiny_config("nitc+mvsi"), num_classes=6)
    alphas = {}
    for epoch, step in ((1, 0), (1, 1), (1, 106), (1, 211), (2, 0)):
        for head in model.heads.values():
            head.on_step(epoch, step, 212)
        alphas[(epoch, step)] = model.heads["nitc"].alpha
        assert model.heads["mvsi"].alpha == alphas[(epoch, step)]
    assert [alphas[k] for k in sorted(alphas)] == pytest.approx([0, 0.0023585, 0.25, 0.4976415, 0.5], abs=1e-7)


# ---------------------------------------------------------------- V1 / V10: parameters and optimizer
def _tbps_config(loss_names: str):
    args = ["--config_file", str(REPO / "configs/tbps_clip/cuhk_pedes.yaml"), "--pretrain_choice", "none",
            "--loss_names", loss_names]
    return resolve(build_parser("t").parse_args(args))


@pytest.mark.parametrize("loss_names, trainable, decayed", [("nitc+mvsi+ritc+citc+ssi", 149_162_625, 103),
                                                            ("nitc+ritc", 149_030_913, 101)])
def test_parameter_counts_and_optimizer_groups(loss_names, trainable, decayed):
    cfg = _tbps_config(loss_names)
    model = build_model(cfg, num_classes=4)
    assert model.encoder.visual.positional_embedding.shape == (197, 768)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable  # paper: 149.2M / 149.0M
    optimizer = build_optimizer(cfg, model)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.02 for p in g["params"]}
    assert {g["lr"] for g in optimizer.param_groups} == {1e-4}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.02}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[i] for i in decay}
    assert len(decayed_names) == decayed
    assert all(p is not model.encoder.visual.conv1.weight for g in optimizer.param_groups for p in g["params"])
    for name in ("encoder.visual.positional_embedding", "encoder.positional_embedding", "encoder.token_embedding.weight",
                 "encoder.visual.proj", "encoder.text_projection", "encoder.transformer.resblocks.0.attn.in_proj_weight",
                 "encoder.transformer.resblocks.0.mlp.c_fc.weight"):
        assert name in decayed_names, name
    for name in ("encoder.visual.class_embedding", "heads.logit_scale.theta", "encoder.ln_final.weight",
                 "encoder.visual.transformer.resblocks.0.attn.in_proj_bias"):
        assert name not in decayed_names, name
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-8
    assert isinstance(optimizer, torch.optim.AdamW)


def test_frozen_patch_embedding_gets_no_gradient():
    cfg = tiny_config("nitc+ssi")
    cfg.freeze_patch_embed = True
    model = build_model(cfg, num_classes=6)
    batch = fixed_batch()
    outputs = model(batch)
    sum(v for k, v in outputs.items() if k.endswith("_loss")).backward()
    assert model.encoder.visual.conv1.weight.grad is None
    assert model.heads["ssi"].mlp.fc1.weight.grad is not None


def test_ssi_trains_the_image_tower_and_its_mlp_only():
    model = build_model(tiny_config("ssi"), num_classes=6)
    model(fixed_batch())["ssi_loss"].backward()
    assert model.encoder.visual.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    assert model.heads["ssi"].mlp.fc2.weight.grad.abs().sum() > 0
    assert model.encoder.transformer.resblocks[0].attn.in_proj_weight.grad is None


def test_recipe_constraints_are_config_errors():
    cfg = tiny_config("nitc")
    cfg.accum_steps = 2
    with pytest.raises(ConfigError, match="head 'nitc' needs the whole batch in one step"):
        build_model(cfg, num_classes=6)
    cfg = tiny_config("ssi")
    cfg.image_cache = True
    with pytest.raises(ConfigError, match="cannot use image_cache"):
        build_model(cfg, num_classes=6)


# ---------------------------------------------------------------- the recipe on toy data
RECIPE = ["--loss_names", "nitc+mvsi+ritc+citc+ssi", "--nitc_loss_weight", "0.5", "--mvsi_loss_weight", "0.5",
          "--text_attn_dropout", "0.05", "--freeze_patch_embed", "--normalization", "imagenet", "--img_aug_pool", "2",
          "--test_resize_interpolation", "bicubic", "--caption_clean", "tbps", "--back_translation_prob", "0.1",
          "--random_deletion_prob", "0.05", "--drop_last", "--optimizer", "AdamW", "--beta", "0.98",
          "--weight_decay", "0.02", "--no_decay_1d", "--lr_schedule_unit", "iteration", "--warmup_factor", "0.01",
          "--target_lr", "5e-6", "--eval_period", "1", "--lr", "1e-3"]


def test_two_epochs_of_the_full_recipe_on_toy_data(toy_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    path = root / "CUHK-PEDES" / "reid_raw.json"
    records = json.loads(path.read_text())
    for record in records[::2]:  # half the records carry back-translations
        record["captions_bt"] = [" ".join(reversed(c.split())) for c in record["captions"]]
    path.write_text(json.dumps(records))
    run = tmp_path / "run"
    report = train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(root),
                               "--output_dir", str(run), "--num_epoch", "2", *RECIPE])
    log = (run / "train_log.txt").read_text()
    for epoch in (1, 2):
        line = next(line for line in log.splitlines() if f"epoch {epoch} done" in line)
        values = dict(item.split(": ") for item in line.split(", ")[2:])
        for key in ("nitc_loss", "mvsi_loss", "ritc_loss", "citc_loss", "ssi_loss", "logit_scale"):
            assert math.isfinite(float(values[key])), (epoch, key)
    assert "of 64 training captions (" in log and "have a back-translation" in log
    assert float(values["nitc_alpha"]) == 0.5
    state = torch.load(run / "last.pth", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 2 * 4  # stepped per iteration: 64 captions / 16, drop_last
    assert report["selection"]["split"] == "test" and 0 <= report["t2i"]["R1"] <= 100


def test_tbps_configs_hold_the_recipes():
    full = _tbps_config("nitc+mvsi+ritc+citc+ssi")
    assert (full.batch_size, full.num_epoch, full.lr, full.seed, full.img_size) == (320, 5, 1e-4, 1, [224, 224])
    assert (full.nitc_loss_weight, full.mvsi_loss_weight, full.ritc_loss_weight, full.citc_loss_weight,
            full.ssi_loss_weight) == (0.5, 0.5, 1.0, 0.1, 0.4)
    simplified = resolve(build_parser("t").parse_args(
        ["--config_file", str(REPO / "configs/tbps_clip/rstpreid_simplified.yaml")]))
    assert (simplified.loss_names, simplified.nitc_loss_weight, simplified.seed) == ("nitc+ritc", 1.0, 0)
    assert simplified.dataset_name == "RSTPReid" and simplified.back_translation_prob == 0.1


# ---------------------------------------------------------------- MixGen / ConcatGen (off in both recipes)
def test_mixgen_and_concatgen_pair_the_first_samples(tokenizer):
    from datasets.batch_mix import BatchMix, join_captions
    from utils.simple_tokenizer import tokenize
    captions = [f"a person number {i} in red" for i in range(10)]
    ids = torch.stack([tokenize(c, tokenizer, 32) for c in captions])
    images = torch.randn(10, 3, 8, 6)
    batch = {"images": images.clone(), "caption_ids": ids.clone(), "pids": torch.arange(10)}
    assert BatchMix("mixgen", prob=1.0, ratio=0.2, lam=0.5)(batch)
    for i in range(2):  # num = int(0.2 x 10) = 2: samples 0, 1 take partners 2, 3
        assert torch.allclose(batch["images"][i], 0.5 * images[i] + 0.5 * images[i + 2])
        assert torch.equal(batch["caption_ids"][i], tokenize(captions[i] + " " + captions[i + 2], tokenizer, 32))
    assert torch.equal(batch["images"][2:], images[2:]) and torch.equal(batch["caption_ids"][2:], ids[2:])
    assert torch.equal(batch["pids"], torch.arange(10))
    batch = {"images": images.clone(), "caption_ids": ids.clone()}
    BatchMix("concatgen", prob=1.0, ratio=0.1)(batch)
    mixed = batch["images"][0]
    assert mixed.shape == (3, 8, 6) and not torch.equal(mixed, images[0])
    left = F.interpolate(images[0][None], size=(8, 3), mode="bilinear", antialias=True, align_corners=False)[0]
    assert torch.allclose(mixed[:, :, :3], left)  # no second normalisation (upstream's quirk)
    long = tokenize(" ".join(["word"] * 20), tokenizer, 16)
    joined = join_captions(long, long)
    assert joined[-1] == tokenizer.eot_id and (joined != 0).all()  # cut to the length, EOT kept last
    draws = BatchMix("mixgen", prob=0.1, ratio=0.1, rng=random.Random(0))  # a batch is mixed with p 0.1
    assert sum(draws({"images": images.clone(), "caption_ids": ids.clone()}) for _ in range(5000)) == \
        pytest.approx(500, abs=70)


def test_mixgen_in_training(toy_root, tmp_path):
    run = tmp_path / "run"
    train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root),
                      "--output_dir", str(run), "--num_epoch", "1", "--loss_names", "nitc+ritc", "--mixgen",
                      "concatgen", "--mixgen_prob", "1.0", "--mixgen_ratio", "0.25"])
    line = next(line for line in (run / "train_log.txt").read_text().splitlines() if "epoch 1 done" in line)
    assert "mixed_batches: 4.0000" in line  # every one of the 4 batches
