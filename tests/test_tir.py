"""TIR head (UIT text-guided image restoration), checked against SEN (Delong-liu-bupt/SEN @ 3d887c1):
random_masking in model/clip_model.py, model/pos_embed.py, and cross_former_mae, forward_loss and
rgb_to_weighted_grayscale in model/build.py."""
from __future__ import annotations

import math

import pytest
import torch

from model.build import build_model
from model.clip import CLIPConfig, CLIPEncoder
from model.heads.base import EncoderOutput
from model.heads.tir import (TIRHead, patchify, random_patch_order, restoration_target, sincos_pos_embed_2d,
                             to_grayscale, tokens_kept, unpatchify)
from model.objectives import masked_patch_mse
from utils.errors import ConfigError

from conftest import tiny_model_config

UIT_LOSSES = "sdm+id+cmt+tir"


def caption_batch(batch: int, length: int = 77, eot: int = 9, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(1, 49000, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0], ids[:, eot], ids[:, eot + 1:] = 49406, 49407, 0
    return ids


def tiny_batch(batch: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(batch, 3, 32, 16, generator=g), "caption_ids": caption_batch(batch, seed=seed),
            "pids": torch.arange(batch) // 2}


@pytest.fixture(scope="module")
def sen_head() -> TIRHead:
    """The head at SEN's size: D = 512, depth 4, 24 x 8 grid of 16-pixel patches."""
    torch.manual_seed(0)
    return TIRHead(512, (24, 8), 16)


# ----------------------------------------------------------------------------------------------
# Masking counts and shapes (SEN random_masking, with its off-by-one loss mask)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patches, ratio, keep, visible, mask_tokens, loss_patches", [
    (192, 0.7, 57, 56, 136, 135),
    (192, 0.8, 38, 37, 155, 154),
    (8, 0.7, 2, 1, 7, 6),
    (8, 0.5, 4, 3, 5, 4),
])
def test_masking_counts(patches, ratio, keep, visible, mask_tokens, loss_patches):
    grid = (patches // 8, 8) if patches == 192 else (4, 2)
    head = TIRHead(64, grid, 8, mask_ratio=ratio, depth=1)
    assert head.keep == tokens_kept(patches, ratio) == keep
    ids_shuffle, ids_restore = random_patch_order(3, patches, torch.device("cpu"))
    mask = head.loss_mask(ids_restore)
    visible_ids = ids_shuffle[:, :keep - 1]
    assert visible_ids.shape[1] == visible and patches - visible == mask_tokens
    assert (mask.sum(dim=1) == loss_patches).all()
    assert (mask.gather(1, visible_ids) == 0).all()  # every visible patch is outside the loss
    dropped_unsupervised = (patches - visible) - loss_patches
    assert dropped_unsupervised == 1  # SEN's off-by-one: the first dropped rank is not supervised
    head.mask_exact = True
    assert (head.loss_mask(ids_restore).sum(dim=1) == mask_tokens).all()


def test_masked_pass_shapes_and_order():
    """ViT-B/16 grid: 57 encoder tokens; ids_restore is a permutation; CLS first, kept order kept."""
    cfg = CLIPConfig(embed_dim=32, vision_width=64, vision_layers=1, text_width=32, text_layers=1)
    torch.manual_seed(0)
    encoder = CLIPEncoder(cfg).eval()
    images = torch.randn(2, 3, 384, 128)
    ids_shuffle, ids_restore = random_patch_order(2, 192, images.device)
    assert ids_restore.shape == (2, 192)
    for row in ids_restore:
        assert sorted(row.tolist()) == list(range(192))
    assert not torch.equal(ids_restore[0], ids_restore[1])  # each sample its own mask
    keep = tokens_kept(192, 0.7)
    with torch.no_grad():
        full = encoder.encode_image(images)
        masked = encoder.encode_image(images, keep_patches=ids_shuffle[:, :keep - 1])
        everything = encoder.encode_image(images, keep_patches=ids_shuffle)
    assert masked.shape == (2, 57, 32)
    # Attention is permutation-equivariant: all patches in shuffled order = the full pass permuted,
    # with CLS first (the position embedding is added before the drop).
    torch.testing.assert_close(everything[:, 0], full[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(everything[:, 1:], full[:, 1:].gather(
        1, ids_shuffle.unsqueeze(-1).expand(-1, -1, 32)), atol=1e-5, rtol=0)
    assert not torch.allclose(masked[:, 0], full[:, 0], atol=1e-3)  # CLS sees only the kept patches


# ----------------------------------------------------------------------------------------------
# Only masked patches count in the loss (SEN forward_loss)
# ----------------------------------------------------------------------------------------------
TARGET = torch.tensor([[[1.0, 1, 1], [2, 2, 2], [0, 0, 3], [3, 0, 0]]])


def test_masked_mse_toy_values():
    pred = torch.zeros_like(TARGET)
    assert masked_patch_mse(pred, TARGET, torch.tensor([[0.0, 1, 1, 0]])).item() == 3.5
    assert 10 * masked_patch_mse(pred, TARGET, torch.tensor([[0.0, 1, 1, 0]])).item() == 35.0
    assert masked_patch_mse(pred, TARGET, torch.ones(1, 4)).item() == 2.75  # "mean over all patches"


def test_masked_mse_ignores_visible_patches():
    mask = torch.tensor([[0.0, 1, 1, 0]])
    pred = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0))
    base = masked_patch_mse(pred, TARGET, mask)
    changed = pred.clone()
    changed[0, 0] += 5.0
    changed[0, 3] -= 7.0
    assert torch.equal(masked_patch_mse(changed, TARGET, mask), base)
    changed[0, 1] += 1.0
    assert not torch.equal(masked_patch_mse(changed, TARGET, mask), base)
    exact = torch.full_like(pred, 9.0)
    exact[0, 1:3] = TARGET[0, 1:3]
    assert masked_patch_mse(exact, TARGET, mask).item() == 0.0


# ----------------------------------------------------------------------------------------------
# Patchify layout; fixed 2-D sin-cos position embedding (SEN model/pos_embed.py); grayscale
# ----------------------------------------------------------------------------------------------
def test_patchify_layout():
    ch, y, x = torch.meshgrid(torch.arange(3.0), torch.arange(384.0), torch.arange(128.0), indexing="ij")
    image = (1000 * ch + 128 * y + x).unsqueeze(0)
    target = patchify(image, 16)
    assert target.shape == (1, 192, 768)
    r, c, py, px, channel = 1, 2, 3, 4, 2
    assert target[0, r * 8 + c, (py * 16 + px) * 3 + channel].item() == 4468
    for r, c, py, px, channel in [(0, 0, 0, 0, 0), (23, 7, 15, 15, 1), (5, 3, 9, 2, 0)]:
        expected = 1000 * channel + 128 * (16 * r + py) + (16 * c + px)
        assert target[0, r * 8 + c, (py * 16 + px) * 3 + channel].item() == expected


def test_norm_pix_target():
    images = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert torch.equal(restoration_target(images, 8), patchify(images, 8))  # SEN: raw normalised pixels
    target = restoration_target(images, 8, norm_pix=True)
    torch.testing.assert_close(target.mean(dim=-1), torch.zeros(2, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(target.var(dim=-1), torch.ones(2, 8), atol=1e-4, rtol=0)


@pytest.mark.parametrize("row, dims", [
    (1, {0: 0.0, 128: 1.0, 256: 0.0, 384: 1.0}),
    (2, {0: 0.841471, 128: 0.540302, 256: 0.0, 384: 1.0, 1: 0.801962}),
    (9, {0: 0.0, 128: 1.0, 256: 0.841471, 384: 0.540302}),
    (192, {0: 0.656987, 128: 0.753902, 256: -0.846220, 384: -0.532833}),
])
def test_position_embedding_rows(row, dims):
    table = sincos_pos_embed_2d(512, (24, 8))
    assert table.shape == (193, 512)
    for dim, value in dims.items():
        assert table[row, dim].item() == pytest.approx(value, abs=1e-5)


def test_position_embedding_is_exact():
    """Every entry equals the formula evaluated in float64 (SEN's float32 table is off by ~3e-6)."""
    table = sincos_pos_embed_2d(512, (24, 8)).double()
    k = torch.arange(128, dtype=torch.float64)
    omega = 10000.0 ** (-k / 128)
    for r, c in [(0, 1), (7, 3), (23, 7)]:
        row = table[1 + 8 * r + c]
        expected = torch.cat([(c * omega).sin(), (c * omega).cos(), (r * omega).sin(), (r * omega).cos()])
        torch.testing.assert_close(row, expected, atol=1e-7, rtol=0)


def test_position_embedding_is_fixed(sen_head):
    assert sen_head.pos_embed.shape == (193, 512)
    assert (sen_head.pos_embed[0] == 0).all()
    assert not sen_head.pos_embed.requires_grad
    assert all(p is not sen_head.pos_embed for p in sen_head.parameters())
    assert "pos_embed" not in sen_head.state_dict()  # rebuilt from the grid, not checkpointed


def test_grayscale_values():
    pixels = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]]).t().reshape(1, 3, 1, 2)
    gray = to_grayscale(pixels)
    assert gray.shape == pixels.shape
    torch.testing.assert_close(gray[0, :, 0, 0], torch.full((3,), 1.8149), atol=1e-5, rtol=0)
    torch.testing.assert_close(gray[0, :, 0, 1], torch.full((3,), 0.2226), atol=1e-5, rtol=0)


def test_retrieval_branch_sees_colour(single_thread):
    """The grayscale copy is the TIR input only: the retrieval features ignore ``tir_gray``."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(loss_names=UIT_LOSSES), num_classes=4)
    batch = tiny_batch()
    images = batch["images"].clone()
    seen = []
    model.heads["cmt"].register_forward_hook(lambda m, args, out: seen.append(args[1].image.global_feature.clone()))
    for gray in (True, False):
        model.heads["tir"].gray = gray
        model(batch)
    assert torch.equal(batch["images"], images)  # not converted in place
    assert torch.equal(seen[0], seen[1])
    assert torch.allclose(seen[0], model.encode_image(images))


# ----------------------------------------------------------------------------------------------
# Unshuffle with mask tokens; decoder wiring (no residual after the text cross-attention) and size
# ----------------------------------------------------------------------------------------------
def test_unshuffle_puts_tokens_back(sen_head):
    batch, patches, dim = 2, 192, 512
    tokens = torch.arange(1, patches + 1, dtype=torch.float32).view(1, patches, 1).expand(batch, -1, dim)
    ids_shuffle, ids_restore = random_patch_order(batch, patches, torch.device("cpu"))
    keep = sen_head.keep
    cls = torch.full((batch, 1, dim), -1.0)
    encoded = torch.cat([cls, tokens.gather(1, ids_shuffle[:, :keep - 1, None].expand(-1, -1, dim))], dim=1)
    with torch.no_grad():
        sen_head.mask_token.fill_(-7.0)
        grid = sen_head.unshuffle(encoded, ids_restore)
        sen_head.mask_token.zero_()
    assert grid.shape == (batch, 1 + patches, dim)
    assert (grid[:, 0] == -1).all()
    visible = ids_restore < keep - 1
    expected = torch.where(visible, torch.arange(1.0, patches + 1), torch.tensor(-7.0))
    assert torch.equal(grid[:, 1:, 0], expected)
    assert (visible.sum(dim=1) == 56).all()


def test_decoder_has_no_residual_around_cross_attention(sen_head):
    torch.manual_seed(1)
    image_tokens, text = torch.randn(2, 57, 512), torch.randn(2, 77, 512)
    _, ids_restore = random_patch_order(2, 192, torch.device("cpu"))
    with torch.no_grad():
        pred = sen_head.decode(image_tokens, text, ids_restore)
        assert pred.shape == (2, 192, 768)
        assert not torch.allclose(pred, sen_head.decode(image_tokens, torch.randn(2, 77, 512), ids_restore))
        saved = {k: v.clone() for k, v in sen_head.cross_attn.out_proj.state_dict().items()}
        sen_head.cross_attn.out_proj.weight.zero_()
        sen_head.cross_attn.out_proj.bias.zero_()
        flat = sen_head.decode(image_tokens, text, ids_restore)
        sen_head.cross_attn.out_proj.load_state_dict(saved)
    # Nothing of the image or the positions survives the cross-attention: all patches identical.
    torch.testing.assert_close(flat, flat[:, :1].expand_as(flat), atol=1e-5, rtol=0)


def test_sen_size_parameter_count(sen_head):
    assert sum(p.numel() for p in sen_head.parameters() if p.requires_grad) == 14_322_432
    assert torch.equal(sen_head.mask_token, torch.zeros(1, 1, 512))
    assert sen_head.cross_attn.in_proj_weight.std().item() == pytest.approx(512 ** -0.5, rel=0.02)
    assert sen_head.cross_attn.out_proj.weight.std().item() == pytest.approx(0.015625, rel=0.02)
    block = sen_head.decoder.resblocks[0]
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.03125, rel=0.02)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.015625, rel=0.02)


def test_switches_change_the_computation(sen_head):
    torch.manual_seed(2)
    image_tokens, text = torch.randn(2, 57, 512), torch.randn(2, 77, 512)
    _, ids_restore = random_patch_order(2, 192, torch.device("cpu"))
    keep = torch.arange(77) < 10
    with torch.no_grad():
        base = sen_head.decode(image_tokens, text, ids_restore)
        padded = text.clone()
        padded[:, 10:] += 3.0
        masked = sen_head.decode(image_tokens, text, ids_restore, keep.expand(2, -1))
        # with the padding mask, what follows EOT cannot matter; without it, it does (SEN)
        torch.testing.assert_close(masked, sen_head.decode(image_tokens, padded, ids_restore, keep.expand(2, -1)))
        assert not torch.allclose(base, sen_head.decode(image_tokens, padded, ids_restore))
        sen_head.residual = True
        assert not torch.allclose(base, sen_head.decode(image_tokens, text, ids_restore))
        sen_head.residual = False


def test_config_errors():
    with pytest.raises(ConfigError, match="non-overlapping"):
        build_model(tiny_model_config(loss_names="sdm+tir", stride_size=6), num_classes=4)
    with pytest.raises(ConfigError, match="tir_mask_ratio"):
        build_model(tiny_model_config(loss_names="sdm+tir", tir_mask_ratio=1.0), num_classes=4)


# ----------------------------------------------------------------------------------------------
# Gradient reach, inference invariance, and the logged losses being the weighted terms
# ----------------------------------------------------------------------------------------------
def test_tir_gradients_reach_encoder_and_decoder(single_thread):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(loss_names="tir"), num_classes=4)
    model(tiny_batch())["tir_loss"].backward()
    head, encoder = model.heads["tir"], model.encoder
    for name, param in [("conv1", encoder.visual.conv1.weight), ("token_embedding", encoder.token_embedding.weight),
                        ("mask_token", head.mask_token), ("cross_attn", head.cross_attn.in_proj_weight),
                        ("decoder_pred", head.decoder_pred.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert head.pos_embed.grad is None


def test_heads_do_not_touch_inference(single_thread):
    batch = tiny_batch()
    features = []
    for losses in ("sdm+id", UIT_LOSSES):
        torch.manual_seed(0)
        model = build_model(tiny_model_config(loss_names=losses), num_classes=4).eval()
        calls = []
        for head in model.heads.values():
            head.register_forward_hook(lambda *args: calls.append(1))
        with torch.no_grad():
            features.append((model.encode_image(batch["images"]), model.encode_text(batch["caption_ids"])))
        assert not calls
    assert torch.equal(features[0][0], features[1][0]) and torch.equal(features[0][1], features[1][1])


def test_logged_losses_are_the_weighted_terms(single_thread):
    """total = sdm + id + 10 cmt + 10 tir: the recipe's entries are 10x the unit-weight ones."""
    batch = tiny_batch()
    outputs = []
    for weight in (1.0, 10.0):
        torch.manual_seed(0)
        model = build_model(tiny_model_config(loss_names=UIT_LOSSES, cmt_loss_weight=weight,
                                              tir_loss_weight=weight), num_classes=4)
        torch.manual_seed(5)  # the same random patch mask
        outputs.append(model(batch))
    unit, recipe = outputs
    for key in ("cmt_loss", "tir_loss"):
        assert recipe[key].item() == pytest.approx(10 * unit[key].item(), rel=1e-6)
    for key in ("sdm_loss", "id_loss"):
        assert recipe[key].item() == pytest.approx(unit[key].item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Smoke test: the losses fall on a repeated batch
# ----------------------------------------------------------------------------------------------
def test_repeated_batch_smoke(single_thread):
    torch.manual_seed(0)
    cfg = tiny_model_config(loss_names=UIT_LOSSES, cmt_loss_weight=10.0, tir_loss_weight=10.0)
    model = build_model(cfg, num_classes=8)
    batch = tiny_batch(8)
    batch["pids"] = torch.arange(8)
    # Restorable images: one colour per sample (given by its caption) plus a vertical gradient.
    colours = torch.randn(8, 3, 1, 1, generator=torch.Generator().manual_seed(3))
    batch["images"] = colours + torch.linspace(-1, 1, 32).view(1, 1, 32, 1).expand(8, 3, 32, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(50):
        out = model(batch)
        total = sum(v for k, v in out.items() if k.endswith("_loss"))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append((out["tir_loss"].item(), out["cmt_loss"].item()))
        assert all(math.isfinite(v) for v in history[-1])
    first_tir = sum(h[0] for h in history[:5]) / 5
    last_tir = sum(h[0] for h in history[-5:]) / 5
    assert last_tir < 0.5 * first_tir
    assert sum(h[1] for h in history[-5:]) / 5 < 0.05


def test_encoder_output_for_head_is_reused(single_thread):
    """The TIR decoder reads the first pass's text tokens (no second text-encoder pass)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(loss_names="tir"), num_classes=4)
    batch = tiny_batch()
    calls = []
    model.encoder.transformer.register_forward_hook(lambda *args: calls.append(1))
    out = model.encode(batch)
    assert isinstance(out, EncoderOutput) and len(calls) == 1
    model.heads["tir"](batch, out, model.encoder)
    assert len(calls) == 1


def test_unpatchify_inverts_patchify():
    images = torch.randn(2, 3, 384, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpatchify(patchify(images, 16), (24, 8), 16), images)
