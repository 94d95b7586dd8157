"""OpenAI CLIP checkpoint loading at tiny size, as IRRA does it (anosorae/IRRA @ cfc2378
model/clip_model.py: state-dict shapes, meta keys, resize_pos_embed)."""
from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
import torch

from model import clip_loading
from model.clip_loading import (CheckpointError, download_openai_checkpoint, infer_config,
                                load_openai_clip, read_state_dict, resize_pos_embed)

IGNORED = {"logit_scale", "input_resolution", "context_length", "vocab_size"}
POS = "visual.positional_embedding"

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _load(path, image_size=(384, 128), stride=16, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_openai_clip(str(path), image_size, stride, **kwargs)


def _bilinear_reference(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Independent float64 bilinear resize, align_corners=False (half-pixel centres, edge clamp).

    ``grid`` is [H, W, C]; returns [out_h, out_w, C]."""
    h, w, _ = grid.shape

    def coords(n_out, n_in):
        src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        src = np.clip(src, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = coords(out_h, h)
    x0, x1, fx = coords(out_w, w)
    top = grid[y0][:, x0] * (1 - fx)[None, :, None] + grid[y0][:, x1] * fx[None, :, None]
    bottom = grid[y1][:, x0] * (1 - fx)[None, :, None] + grid[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


# ----------------------------------------------------------------------------------------------
# Loading both formats
# ----------------------------------------------------------------------------------------------
def test_jit_archive_fixture_matches_openai_layout(openai_checkpoint):
    """Sanity of the fixture: torch.jit.load(...).state_dict() gives the tensors + meta keys."""
    path, state = openai_checkpoint(fmt="jit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert set(loaded) == set(state) | {"input_resolution", "context_length", "vocab_size"}
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("fmt", ["jit", "state_dict"])
def test_read_state_dict_formats(openai_checkpoint, fmt):
    path, state = openai_checkpoint(fmt=fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read = read_state_dict(path)
    expected_keys = set(state) | ({"input_resolution", "context_length", "vocab_size"} if fmt == "jit" else set())
    assert set(read) == expected_keys
    for k, v in state.items():
        assert torch.equal(read[k], v), k


def test_both_formats_load_identically(openai_checkpoint):
    jit_path, state = openai_checkpoint("a.pt", fmt="jit", seed=3)
    sd_path, state2 = openai_checkpoint("b.pt", fmt="state_dict", seed=3)
    assert all(torch.equal(state[k], state2[k]) for k in state)
    a = _load(jit_path).state_dict()
    b = _load(sd_path).state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fmt", ["jit", "state_dict"])
def test_every_tensor_equals_checkpoint(openai_checkpoint, fmt):
    path, state = openai_checkpoint(fmt=fmt, seed=1)
    loaded = _load(path).state_dict()
    # no missing / unexpected backbone keys apart from the ignored ones
    assert set(loaded) == set(state) - IGNORED
    for k, v in loaded.items():
        assert v.dtype == torch.float32, k
        if k == POS:
            continue
        assert torch.equal(v, state[k]), k


def test_inferred_config(openai_checkpoint):
    _, state = openai_checkpoint(vision_width=128, vision_layers=2, patch=16, grid=14,
                                 text_width=64, text_layers=3, embed_dim=48)
    cfg = infer_config(state, (384, 128), 16)
    assert cfg.vision_width == 128
    assert cfg.vision_layers == 2
    assert cfg.vision_patch_size == 16
    assert cfg.text_width == 64
    assert cfg.text_layers == 3
    assert cfg.embed_dim == 48
    assert cfg.context_length == 77
    assert cfg.vocab_size == 49408
    assert tuple(cfg.image_size) == (384, 128)  # replaces the native 224
    assert cfg.stride_size == 16
    assert tuple(cfg.grid_size) == (24, 8)


def test_inferred_config_other_patch(openai_checkpoint):
    _, state = openai_checkpoint(patch=32, grid=7, vision_layers=3)
    cfg = infer_config(state, (384, 128), 32)
    assert cfg.vision_patch_size == 32
    assert cfg.vision_layers == 3
    assert tuple(cfg.grid_size) == ((384 - 32) // 32 + 1, (128 - 32) // 32 + 1)


def test_shapes_stride_16(openai_checkpoint):
    path, _ = openai_checkpoint(vision_width=64, embed_dim=32)
    model = _load(path).eval()
    assert model.visual.positional_embedding.shape == (193, 64)
    assert model.visual.conv1.stride == (16, 16)
    assert model.visual.conv1.kernel_size == (16, 16)
    assert model.visual.conv1.bias is None
    torch.manual_seed(0)
    images = torch.randn(2, 3, 384, 128)
    text = torch.zeros(2, 77, dtype=torch.long)
    text[:, 0], text[:, 1], text[:, 2] = 49406, 320, 49407
    with torch.no_grad():
        img = model.encode_image(images)
        txt = model.encode_text(text)
    assert img.shape == (2, 193, 32)
    assert txt.shape == (2, 77, 32)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()


def test_shapes_stride_12(openai_checkpoint):
    path, state = openai_checkpoint()
    model = _load(path, stride=12).eval()
    assert model.visual.conv1.stride == (12, 12)
    assert tuple(model.config.grid_size) == (31, 10)
    assert model.visual.positional_embedding.shape == (311, 64)
    # the resize targets the 31 x 10 grid
    expected = _bilinear_reference(state[POS][1:].double().reshape(14, 14, -1).numpy(), 31, 10)
    got = model.visual.positional_embedding[1:].detach().double().reshape(31, 10, -1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with torch.no_grad():
        out = model.encode_image(torch.randn(1, 3, 384, 128))
    assert out.shape == (1, 311, 32)


def test_loaded_pos_embed_is_bilinear_resize(openai_checkpoint):
    path, state = openai_checkpoint(seed=5)
    model = _load(path)
    pos = model.visual.positional_embedding.detach()
    assert torch.equal(pos[0], state[POS][0])  # CLS row unchanged
    expected = _bilinear_reference(state[POS][1:].double().reshape(14, 14, -1).numpy(), 24, 8)
    np.testing.assert_allclose(pos[1:].double().reshape(24, 8, -1).numpy(), expected, atol=1e-6)


def test_no_resize_when_grid_matches(openai_checkpoint):
    """A checkpoint whose grid already matches (224x224, s=16 -> 14x14) is copied verbatim."""
    path, state = openai_checkpoint()
    model = _load(path, image_size=(224, 224))
    assert torch.equal(model.visual.positional_embedding.detach(), state[POS])


@pytest.mark.parametrize("wrap", ["state_dict", "model"])
def test_wrapped_checkpoints(openai_checkpoint, wrap):
    plain_path, state = openai_checkpoint("plain.pt", seed=2)
    wrapped_path, _ = openai_checkpoint("wrapped.pt", seed=2, wrap=wrap)
    raw = torch.load(wrapped_path, weights_only=True)
    assert list(raw) == [wrap]
    if wrap == "state_dict":
        assert all(k.startswith("module.") for k in raw["state_dict"])
    read = read_state_dict(wrapped_path)
    assert set(read) == set(state)
    a, b = _load(plain_path).state_dict(), _load(wrapped_path).state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fp16_checkpoint_is_loaded_as_fp32(openai_checkpoint, tmp_path):
    _, state = openai_checkpoint()
    half = {k: v.half() for k, v in state.items()}
    path = tmp_path / "half.pt"
    torch.save(half, path)
    loaded = _load(path).state_dict()
    for k, v in loaded.items():
        assert v.dtype == torch.float32
        if k != POS:
            assert torch.equal(v, half[k].float()), k
    # the resize is computed in fp32 (IRRA interpolates in the checkpoint's dtype) from the fp16 values
    expected = _bilinear_reference(half[POS][1:].double().reshape(14, 14, -1).numpy(), 24, 8)
    np.testing.assert_allclose(loaded[POS][1:].double().reshape(24, 8, -1).numpy(), expected, atol=2e-3)


def test_meta_keys_and_logit_scale_ignored(openai_checkpoint):
    path, _ = openai_checkpoint(fmt="jit")
    model = _load(path)
    keys = set(model.state_dict())
    assert not keys & IGNORED
    assert not any("logit_scale" in k for k in keys)


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [
    "ln_final.bias",
    "visual.ln_post.weight",
    "transformer.resblocks.0.mlp.c_fc.bias",
    "visual.transformer.resblocks.0.attn.out_proj.weight",
    "visual.class_embedding",
    "visual.proj",
    "text_projection",
    "visual.conv1.weight",
    "ln_final.weight",
    "positional_embedding",
    "token_embedding.weight",
    "visual.positional_embedding",
])
def test_missing_key_is_named(openai_checkpoint, key):
    path, _ = openai_checkpoint(drop=(key,))
    with pytest.raises(CheckpointError) as info:
        _load(path)
    assert key in str(info.value)


@pytest.mark.parametrize("key, size", [("ln_final.bias", 65),              # wrong shape
                                       ("visual.extra_head.weight", 3)])  # unexpected key
def test_mismatched_key_is_named(openai_checkpoint, tmp_path, key, size):
    _, state = openai_checkpoint()
    state[key] = torch.zeros(size)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        _load(path)
    assert key in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "ViT-X.pt"
    with pytest.raises(CheckpointError) as info:
        _load(path)
    assert str(path) in str(info.value)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint\x00\x01\x02" * 50)
    with pytest.raises(CheckpointError) as info:
        _load(path)
    assert str(path) in str(info.value)


def test_file_without_tensors(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text_length", [64, 78])
def test_text_length_must_be_77(openai_checkpoint, text_length):
    path, _ = openai_checkpoint()
    with pytest.raises(CheckpointError) as info:
        _load(path, text_length=text_length)
    assert str(text_length) in str(info.value) and "77" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Resize values: bilinear, align_corners=False, as IRRA's resize_pos_embed
# ----------------------------------------------------------------------------------------------
def _grid_pos_embed(values: torch.Tensor, width: int = 4) -> torch.Tensor:
    """[197, width]: CLS row of 100s, then the 14x14 ``values`` (row-major) in every channel."""
    cls = torch.full((1, width), 100.0)
    return torch.cat([cls, values.reshape(196, 1).expand(196, width)], 0).clone()


def test_resize_row_index_grid():
    rows = torch.arange(14, dtype=torch.float32)[:, None].expand(14, 14)
    out = resize_pos_embed(_grid_pos_embed(rows), (24, 8))
    assert out.shape == (193, 4)
    assert torch.equal(out[0], torch.full((4,), 100.0))
    grid = out[1:].reshape(24, 8, 4)
    for i in range(24):
        expected = min(max((i + 0.5) * 14 / 24 - 0.5, 0.0), 13.0)
        assert torch.allclose(grid[i], torch.full((8, 4), expected), atol=1e-5), i
    assert grid[0, 0, 0].item() == pytest.approx(0.0, abs=1e-5)
    assert grid[1, 3, 0].item() == pytest.approx(0.375, abs=1e-5)
    assert grid[12, 5, 2].item() == pytest.approx(6.791667, abs=1e-5)
    assert grid[23, 7, 3].item() == pytest.approx(13.0, abs=1e-5)


def test_resize_column_index_grid():
    cols = torch.arange(14, dtype=torch.float32)[None, :].expand(14, 14)
    out = resize_pos_embed(_grid_pos_embed(cols), (24, 8))
    grid = out[1:].reshape(24, 8, 4)
    for j in range(8):
        expected = (j + 0.5) * 1.75 - 0.5
        assert torch.allclose(grid[:, j], torch.full((24, 4), expected), atol=1e-5), j
    assert grid[10, 0, 0].item() == pytest.approx(0.375, abs=1e-5)
    assert grid[3, 7, 1].item() == pytest.approx(12.625, abs=1e-5)


def test_resize_flattening_is_row_major():
    """Output position p = row*8 + col, matching the conv output's flatten order."""
    values = torch.arange(14, dtype=torch.float32)[:, None] * 100 + torch.arange(14, dtype=torch.float32)[None, :]
    out = resize_pos_embed(_grid_pos_embed(values, width=1), (24, 8))[1:, 0]
    for p in (0, 7, 8, 100, 191):
        r, c = divmod(p, 8)
        ry = min(max((r + 0.5) * 14 / 24 - 0.5, 0.0), 13.0)
        cx = (c + 0.5) * 1.75 - 0.5
        assert out[p].item() == pytest.approx(100 * ry + cx, abs=1e-3)


def test_resize_constant_stays_constant():
    out = resize_pos_embed(_grid_pos_embed(torch.full((14, 14), -2.5)), (31, 10))
    assert out.shape == (311, 4)
    assert torch.equal(out[0], torch.full((4,), 100.0))
    assert torch.allclose(out[1:], torch.full((310, 4), -2.5), atol=1e-6)


def test_resize_random_matches_reference():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(197, 6, generator=gen, dtype=torch.float64)
    out = resize_pos_embed(pos, (24, 8))
    assert out.dtype == torch.float64
    assert torch.equal(out[0], pos[0])
    expected = _bilinear_reference(pos[1:].reshape(14, 14, 6).numpy(), 24, 8)
    np.testing.assert_allclose(out[1:].reshape(24, 8, 6).numpy(), expected, atol=1e-5)


def test_resize_non_square_fails():
    with pytest.raises(CheckpointError):
        resize_pos_embed(torch.zeros(1 + 15, 4), (24, 8))


# ----------------------------------------------------------------------------------------------
# Download (no network: urlopen is replaced)
# ----------------------------------------------------------------------------------------------
def test_download_offline_error(tmp_path, monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    sha, file_name = clip_loading.OPENAI_MODELS["ViT-B/16"]
    with pytest.raises(CheckpointError) as info:
        download_openai_checkpoint("ViT-B/16", cache_dir=tmp_path)
    url = f"https://openaipublic.azureedge.net/clip/models/{sha}/{file_name}"
    assert calls == [url]
    message = str(info.value)
    assert url in message
    assert "offline" in message
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_download_checksum_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, *a, **k: io.BytesIO(b"not the real ViT-B-16 weights"))
    with pytest.raises(CheckpointError) as info:
        download_openai_checkpoint("ViT-B/16", cache_dir=tmp_path)
    assert "SHA-256" in str(info.value) or "sha" in str(info.value).lower()
    assert not (tmp_path / "ViT-B-16.pt").exists()
    assert not list(tmp_path.iterdir())


def test_download_success_writes_cache(tmp_path, monkeypatch):
    payload = b"tiny fake checkpoint bytes" * 1000
    sha = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(clip_loading.OPENAI_MODELS, "ViT-B/16", (sha, "ViT-B-16.pt"))
    urls = []

    def fake(url, *a, **k):
        urls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    path = download_openai_checkpoint("ViT-B/16", cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "ViT-B-16.pt"
    assert path.read_bytes() == payload
    assert urls == [f"https://openaipublic.azureedge.net/clip/models/{sha}/ViT-B-16.pt"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["ViT-B-16.pt"]


def test_cached_file_with_right_hash_not_downloaded(tmp_path, monkeypatch):
    payload = b"cached bytes"
    (tmp_path / "ViT-B-16.pt").write_bytes(payload)
    monkeypatch.setitem(clip_loading.OPENAI_MODELS, "ViT-B/16",
                        (hashlib.sha256(payload).hexdigest(), "ViT-B-16.pt"))

    def no_network(*a, **k):
        raise AssertionError("must not download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert download_openai_checkpoint("ViT-B/16", cache_dir=tmp_path) == tmp_path / "ViT-B-16.pt"


def test_cached_file_with_wrong_hash_is_redownloaded(tmp_path, monkeypatch):
    good = b"the good bytes"
    (tmp_path / "ViT-B-16.pt").write_bytes(b"stale or truncated")
    monkeypatch.setitem(clip_loading.OPENAI_MODELS, "ViT-B/16",
                        (hashlib.sha256(good).hexdigest(), "ViT-B-16.pt"))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, *a, **k: io.BytesIO(good))
    path = download_openai_checkpoint("ViT-B/16", cache_dir=tmp_path)
    assert path.read_bytes() == good


def test_load_by_name_uses_home_cache(openai_checkpoint, tmp_path, monkeypatch):
    """``load_openai_clip('ViT-B/16')`` reads ~/.cache/clip/ViT-B-16.pt when its hash matches."""
    home = tmp_path / "home"
    cached = home / ".cache" / "clip" / "ViT-B-16.pt"
    _, state = openai_checkpoint(fmt="jit")
    src = next((tmp_path / "ckpts").iterdir())
    cached.parent.mkdir(parents=True)
    cached.write_bytes(src.read_bytes())
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setitem(clip_loading.OPENAI_MODELS, "ViT-B/16",
                        (hashlib.sha256(cached.read_bytes()).hexdigest(), "ViT-B-16.pt"))
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("no download")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_openai_clip("ViT-B/16", (384, 128), 16)
    assert torch.equal(model.text_projection.detach(), state["text_projection"])
    assert model.visual.positional_embedding.shape == (193, 64)


def test_unknown_name_is_treated_as_path(tmp_path):
    with pytest.raises(CheckpointError) as info:
        _load("ViT-Z/99")
    assert "ViT-Z/99" in str(info.value)
