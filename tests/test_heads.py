"""Head registry, the model's forward over all heads and the IRR/MLM head (IRRA, anosorae/IRRA @ cfc2378, model/build.py and model/objectives.py)."""

import pytest
import torch

from model.build import build_model
from model.heads import HEADS, parse_loss_names, register_head
from model.heads.base import Head
from model.heads.identity import IDHead
from model.heads.mlm import MLMHead
from conftest import tiny_model_config

SOT, EOT, MASK = 49406, 49407, 49405
ALL = "sdm+mlm+id+itc+cmpm"
pytestmark = pytest.mark.usefixtures("single_thread")


def make_cfg(**overrides):
    return tiny_model_config(**overrides)


def make_model(loss_names=ALL, num_classes=5, seed=0):
    torch.manual_seed(seed)
    return build_model(make_cfg(loss_names=loss_names), num_classes)


def make_batch(seed=0, batch_size=4, num_classes=5, aliased=False):
    g = torch.Generator().manual_seed(seed)
    caption = torch.zeros(batch_size, 77, dtype=torch.long)
    mlm_ids = torch.zeros_like(caption)
    labels = torch.zeros_like(caption)
    for i in range(batch_size):
        n = 6 + 3 * i
        words = torch.randint(1, 49405, (n,), generator=g)
        caption[i, 0], caption[i, 1:n + 1], caption[i, n + 1] = SOT, words, EOT
        mlm_ids[i] = caption[i]
        for pos in (1, 3, n):  # labelled positions: two masked, one left unchanged
            labels[i, pos] = caption[i, pos]
        mlm_ids[i, 1] = MASK
        mlm_ids[i, 3] = MASK
    batch = {
        "images": torch.randn(batch_size, 3, 32, 16, generator=g),
        "caption_ids": mlm_ids.clone() if aliased else caption,
        "pids": torch.tensor([0, 0, 1, 2, 3, 4, 1, 2][:batch_size]) % num_classes,
        "image_ids": torch.arange(batch_size),
        "mlm_ids": mlm_ids,
        "mlm_labels": labels,
    }
    return batch


# ---------------------------------------------------------------- registry
def test_registry_has_the_irra_heads():
    assert {"sdm", "itc", "cmpm", "id", "mlm"} <= set(HEADS)
    for name, cls in HEADS.items():
        assert issubclass(cls, Head) and cls.name == name


def test_parse_loss_names_whole_tokens_in_order():
    assert parse_loss_names("sdm+mlm+id") == ["sdm", "mlm", "id"]
    assert parse_loss_names("id+sdm") == ["id", "sdm"]
    assert parse_loss_names(" sdm + itc ") == ["sdm", "itc"]


@pytest.mark.parametrize("bad", ["sdm+foo", "sd", "sdmx", "ids+sdm", "mlm+i", "sdm+idmlm"])
def test_unknown_token_is_an_error_listing_known_names(bad):
    with pytest.raises(ValueError) as err:
        parse_loss_names(bad)
    msg = str(err.value)
    for known in ("sdm", "itc", "cmpm", "id", "mlm"):
        assert known in msg


def test_unknown_token_named_in_error():
    with pytest.raises(ValueError, match="foo"):
        parse_loss_names("sdm+foo")


@pytest.mark.parametrize("bad", ["", "+", "sdm+sdm"])
def test_empty_or_repeated_loss_names_rejected(bad):
    with pytest.raises(ValueError):
        parse_loss_names(bad)


def test_register_twice_rejected():
    class Dup(Head):
        name = "sdm"

    with pytest.raises(ValueError):
        register_head(Dup)
    assert HEADS["sdm"] is not Dup


def test_build_model_creates_exactly_the_named_heads():
    """Whole tokens, not substrings (IRRA's 'id' in loss_names)."""
    torch.manual_seed(0)
    model = build_model(make_cfg(loss_names="sdm+itc"), 3)
    assert list(model.heads.keys()) == ["sdm", "itc"]
    assert model.required_fields() == set()
    model = build_model(make_cfg(loss_names="mlm+sdm"), 3)
    assert set(model.heads.keys()) == {"mlm", "sdm"}
    assert model.required_fields() == {"mlm_ids", "mlm_labels"}


# ---------------------------------------------------------------- full model forward
@pytest.fixture(scope="module")
def full():
    model = make_model()
    batch = make_batch()
    return model, batch


def test_forward_outputs_all_losses_finite(full):
    model, batch = full
    out = model(batch)
    expected = {f"{n}_loss" for n in ("sdm", "mlm", "id", "itc", "cmpm")} | {"img_acc", "txt_acc", "mlm_acc"}
    assert set(out) == expected
    for key, value in out.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    for key in ("img_acc", "txt_acc", "mlm_acc"):
        assert 0.0 <= out[key].item() <= 1.0


def test_encoder_shapes(full):
    model, batch = full
    enc = model.encode(batch)
    assert enc.image.tokens.shape == (4, 1 + 4 * 2, 64)
    assert enc.text.tokens.shape == (4, 77, 64)
    assert enc.image.global_feature.dtype == torch.float32 and enc.image.global_feature.shape == (4, 64)
    # global text feature = EOT token (argmax of the ids)
    eot = batch["caption_ids"].argmax(dim=1)
    assert torch.equal(enc.text.eot_index, eot)
    assert torch.equal(enc.text.global_feature, enc.text.tokens[torch.arange(4), eot])
    assert torch.equal(enc.image.global_feature, enc.image.tokens[:, 0])
    # the tokens before the projection are public too: projected, they are the tokens
    assert enc.image.hidden.shape == (4, 1 + 4 * 2, 64) and enc.text.hidden.shape == (4, 77, 64)
    torch.testing.assert_close(enc.image.hidden @ model.encoder.visual.proj, enc.image.tokens)
    torch.testing.assert_close(enc.text.hidden @ model.encoder.text_projection, enc.text.tokens)
    torch.testing.assert_close(model.encoder.encode_image(batch["images"]), enc.image.tokens)
    # the stream after the first blocks: block by block, it continues to the final hidden states
    ids = batch["caption_ids"]
    states = model.encoder.text_states(ids, blocks=0)
    assert torch.equal(states, model.encoder.token_embedding(ids) + model.encoder.positional_embedding)
    for block in model.encoder.transformer.resblocks:
        states = block(states, causal=True)
    torch.testing.assert_close(model.encoder.ln_final(states), enc.text.hidden)


def _nonzero_grad(p):
    return p.grad is not None and bool(torch.count_nonzero(p.grad))


def test_total_loss_gradient_reaches_everything():
    model = make_model()
    out = model(make_batch())
    total = sum(v for k, v in out.items() if k.endswith("_loss"))
    total.backward()
    params = dict(model.named_parameters())
    for name in ("encoder.visual.conv1.weight", "encoder.token_embedding.weight",
                 "heads.id.classifier.weight", "heads.id.classifier.bias"):
        assert _nonzero_grad(params[name]), name
    mlm = [n for n in params if n.startswith(("heads.mlm.cross_attn.", "heads.mlm.cross_modal_transformer.",
                                              "heads.mlm.mlm_head."))]
    assert len(mlm) >= 20
    missing = [n for n in mlm if not _nonzero_grad(params[n])]
    assert not missing


def test_mlm_loss_alone_reaches_visual_conv1():
    model = make_model()
    out = model(make_batch())
    out["mlm_loss"].backward()
    params = dict(model.named_parameters())
    assert _nonzero_grad(params["encoder.visual.conv1.weight"])
    assert _nonzero_grad(params["encoder.token_embedding.weight"])
    assert params["heads.id.classifier.weight"].grad is None or \
        not torch.count_nonzero(params["heads.id.classifier.weight"].grad)


# ---------------------------------------------------------------- MLM head init
def test_mlm_and_classifier_init_stds():
    torch.manual_seed(0)
    head = MLMHead(embed_dim=512, vocab_size=2000, depth=4)
    scale, proj, fc = 512 ** -0.5, 0.015625, 0.03125
    assert scale == pytest.approx(0.0442, abs=1e-4)

    def std(t):
        return t.detach().double().std().item()

    assert std(head.cross_attn.in_proj_weight) == pytest.approx(scale, rel=0.02)
    assert std(head.cross_attn.out_proj.weight) == pytest.approx(proj, rel=0.02)
    assert len(head.cross_modal_transformer.resblocks) == 4
    for block in head.cross_modal_transformer.resblocks:
        assert std(block.attn.in_proj_weight) == pytest.approx(scale, rel=0.02)
        assert std(block.attn.out_proj.weight) == pytest.approx(proj, rel=0.02)
        assert std(block.mlp.c_fc.weight) == pytest.approx(fc, rel=0.02)
        assert std(block.mlp.c_proj.weight) == pytest.approx(proj, rel=0.02)
        # PyTorch default U(+-1/sqrt(fan_in)) for the MLP biases
        assert block.mlp.c_fc.bias.abs().max() <= 512 ** -0.5
        assert block.mlp.c_fc.bias.abs().max() > 0.5 * 512 ** -0.5
        assert not torch.count_nonzero(block.attn.in_proj_bias)
        assert not torch.count_nonzero(block.attn.out_proj.bias)
    assert std(head.mlm_head.dense.weight) == pytest.approx(fc, rel=0.02)
    assert std(head.mlm_head.fc.weight) == pytest.approx(proj, rel=0.02)
    assert head.mlm_head.fc.weight.shape == (2000, 512)
    assert not torch.count_nonzero(head.cross_attn.in_proj_bias)
    assert not torch.count_nonzero(head.cross_attn.out_proj.bias)
    for ln in (head.ln_pre_t, head.ln_pre_i, head.ln_post, head.mlm_head.ln):
        assert torch.all(ln.weight == 1) and not torch.count_nonzero(ln.bias)
        assert ln.eps == 1e-5
    classifier = IDHead(512, 1000).classifier
    assert std(classifier.weight) == pytest.approx(0.001, rel=0.02)
    assert not torch.count_nonzero(classifier.bias)


def test_mlm_head_from_config_uses_depth_and_vocab():
    torch.manual_seed(0)
    model = build_model(make_cfg(loss_names="mlm", cmt_depth=2), 3)
    assert len(model.heads.mlm.cross_modal_transformer.resblocks) == 2
    assert model.heads.mlm.mlm_head.fc.out_features == 49408


# ---------------------------------------------------------------- MLM loss
def _reference_mlm(head, text_tokens, image_tokens, labels, perturb=None):
    """IRRA: logits at all B*77 positions, CrossEntropyLoss(ignore_index=0)."""
    x = head.cross_former(text_tokens, image_tokens)
    logits = head.mlm_head(x).float().reshape(-1, head.mlm_head.fc.out_features)
    if perturb is not None:
        logits = logits + perturb
    flat = labels.reshape(-1)
    loss = torch.nn.CrossEntropyLoss(ignore_index=0)(logits, flat)
    keep = flat != 0
    acc = (logits[keep].argmax(1) == flat[keep]).float().mean()
    return loss, acc, logits


@torch.no_grad()
def test_mlm_loss_equals_full_logits_reference(full):
    model, batch = full
    head = model.heads.mlm
    enc = model.encode(batch)
    res = head(batch, enc, model.encoder)
    text_tokens = model.encoder.encode_text(batch["mlm_ids"])
    ref_loss, ref_acc, logits = _reference_mlm(head, text_tokens, enc.image.tokens, batch["mlm_labels"])
    assert logits.shape == (4 * 77, 49408)
    assert res["mlm_loss"].item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert res["mlm_acc"].item() == pytest.approx(ref_acc.item())
    # IRRA ignores label-0 positions: large changes of the logits there leave the loss unchanged
    unlabelled = (batch["mlm_labels"].reshape(-1) == 0)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(logits.shape, generator=g) * 10 * unlabelled[:, None]
    perturbed, _, _ = _reference_mlm(head, text_tokens, enc.image.tokens, batch["mlm_labels"], noise)
    assert perturbed.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert res["mlm_loss"].item() == pytest.approx(perturbed.item(), rel=1e-5)


@torch.no_grad()
def test_mlm_head_ignores_features_at_unlabelled_positions(full, monkeypatch):
    model, batch = full
    head = model.heads.mlm
    enc = model.encode(batch)
    base = head(batch, enc, model.encoder)["mlm_loss"].item()
    original = head.cross_former
    labelled = batch["mlm_labels"] != 0

    def patched(mask):
        def fn(text_tokens, image_tokens):
            x = original(text_tokens, image_tokens)
            return x + 5.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * mask[..., None]
        return fn

    monkeypatch.setattr(head, "cross_former", patched(~labelled))
    assert head(batch, enc, model.encoder)["mlm_loss"].item() == pytest.approx(base, rel=1e-6)
    # control: the same change at labelled positions does change the loss
    monkeypatch.setattr(head, "cross_former", patched(labelled))
    assert abs(head(batch, enc, model.encoder)["mlm_loss"].item() - base) > 1e-3


@torch.no_grad()
def test_mlm_uses_mlm_ids_not_caption_ids(full):
    model, batch = full
    assert not torch.equal(batch["mlm_ids"], batch["caption_ids"])
    head = model.heads.mlm
    enc = model.encode(batch)
    res = head(batch, enc, model.encoder)
    with_masked = _reference_mlm(head, model.encoder.encode_text(batch["mlm_ids"]), enc.image.tokens,
                                 batch["mlm_labels"])[0]
    with_clean = _reference_mlm(head, enc.text.tokens, enc.image.tokens, batch["mlm_labels"])[0]
    assert abs(with_masked.item() - with_clean.item()) > 1e-4
    assert res["mlm_loss"].item() == pytest.approx(with_masked.item(), rel=1e-5)


@torch.no_grad()
def test_aliased_caption_reuse_equals_fresh_text_pass():
    """IRRA compat (caption_ids == mlm_ids): reusing the first text pass gives the same loss."""
    model = make_model()
    batch = make_batch(aliased=True)
    assert torch.equal(batch["caption_ids"], batch["mlm_ids"])
    head = model.heads.mlm
    enc = model.encode(batch)
    res = head(batch, enc, model.encoder)
    fresh = model.encoder.encode_text(batch["mlm_ids"].clone())
    ref_loss, ref_acc, _ = _reference_mlm(head, fresh, enc.image.tokens, batch["mlm_labels"])
    assert res["mlm_loss"].item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert res["mlm_acc"].item() == pytest.approx(ref_acc.item())
    # and the same result through a separate (non-aliased) copy of the same ids
    copy = {**batch, "caption_ids": batch["caption_ids"].clone()}
    assert head(copy, model.encode(copy), model.encoder)["mlm_loss"].item() == pytest.approx(
        res["mlm_loss"].item(), rel=1e-6)


def test_head_weight_scales_loss():
    torch.manual_seed(0)
    cfg = make_cfg(loss_names="sdm+id+mlm", sdm_loss_weight=2.0, id_loss_weight=0.5, mlm_loss_weight=3.0)
    weighted = build_model(cfg, 5)
    plain = make_model("sdm+id+mlm")
    weighted.load_state_dict(plain.state_dict())
    batch = make_batch()
    with torch.no_grad():
        a, b = plain(batch), weighted(batch)
    assert b["sdm_loss"].item() == pytest.approx(2.0 * a["sdm_loss"].item(), rel=1e-5)
    assert b["id_loss"].item() == pytest.approx(0.5 * a["id_loss"].item(), rel=1e-5)
    assert b["mlm_loss"].item() == pytest.approx(3.0 * a["mlm_loss"].item(), rel=1e-5)


def test_sdm_head_uses_fixed_scale_from_temperature():
    torch.manual_seed(0)
    model = build_model(make_cfg(loss_names="sdm+itc", temperature=0.02), 3)
    assert model.heads.sdm.logit_scale == pytest.approx(50.0)
    assert model.heads.itc.logit_scale == pytest.approx(50.0)
    # fixed: not a parameter, not in the state dict
    assert not any("logit_scale" in k for k in model.state_dict())
    assert not list(model.heads.sdm.parameters())


# ---------------------------------------------------------------- training signal
def test_loss_falls_with_adam_on_fixed_batch():
    model = make_model("sdm+id", seed=1)
    batch = make_batch(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        out = model(batch)
        loss = out["sdm_loss"] + out["id_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
