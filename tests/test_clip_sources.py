"""open_clip and Hugging Face CLIP weights: our encoder's features equal the library's own forward
on the same random weights at the native resolution (models built offline by the libraries)."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
import yaml
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from transformers import CLIPConfig as HFConfig
from transformers import CLIPModel

import test as test_entry
import train as train_entry
from model.clip_loading import CheckpointError, ClipWeights, build_clip_encoder, resize_pos_embed
from model.clip_sources import clip_weights, read_open_clip
from test_end_to_end import REPO
from utils.simple_tokenizer import SimpleTokenizer, tokenize

CAPTIONS = ("a woman in a red coat carrying a black bag", "a man", "a boy with a yellow backpack and grey shorts")


def _inputs(size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokenizer = SimpleTokenizer()
    return (torch.randn(2, 3, size, size, generator=generator),
            torch.stack([tokenize(c, tokenizer, 77) for c in CAPTIONS]))


@torch.no_grad()
def _ours(encoder, images, ids) -> tuple[torch.Tensor, torch.Tensor]:
    encoder.eval()
    return encoder.image_global(encoder.encode_image(images)), encoder.text_global(encoder.encode_text(ids), ids)


@torch.no_grad()
def _open_clip_features(model, images, ids) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    return model.encode_image(images), model.encode_text(ids)


def _assert_same(ours, theirs) -> None:
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _tiny_open_clip(quick_gelu: bool) -> CLIP:
    torch.manual_seed(0)
    return CLIP(32, CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=16, image_size=224),
                CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=2), quick_gelu=quick_gelu)


# ---------------------------------------------------------------- open_clip
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_an_open_clip_file_gives_open_clips_features(tmp_path, quick_gelu):
    model = _tiny_open_clip(quick_gelu)
    torch.save(model.state_dict(), tmp_path / "oc.pt")
    weights = clip_weights(f"open_clip:{tmp_path / 'oc.pt'}")
    assert weights.quick_gelu is None  # a bare file does not say
    weights.vision_heads, weights.text_heads = 2, 4  # head_width 32 and heads 4 are not width // 64
    encoder = build_clip_encoder(weights, (224, 224), 16, 77, "quick_gelu" if quick_gelu else "auto")
    assert encoder.config.quick_gelu == quick_gelu
    images, ids = _inputs()
    _assert_same(_ours(encoder, images, ids), _open_clip_features(model, images, ids))
    wrong = build_clip_encoder(weights, (224, 224), 16, 77, "gelu" if quick_gelu else "quick_gelu")
    assert not torch.allclose(_ours(wrong, images, ids)[1], _open_clip_features(model, images, ids)[1], atol=1e-3)


def test_open_clip_named_models_download_through_open_clip(tmp_path, monkeypatch):
    """The name path: open_clip's pretrained config, its download (stubbed to a file of open_clip's
    own random-weight ViT-B-16), the activation and head counts from open_clip's model config."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    path = tmp_path / "ViT-B-16.pt"
    torch.save(model.state_dict(), path)
    asked = []
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg, **kw: asked.append(cfg) or str(path))
    weights = read_open_clip("ViT-B-16:laion2b_s34b_b88k")
    assert asked[0]["hf_hub"].startswith("laion/")
    assert (weights.quick_gelu, weights.vision_heads, weights.text_heads) == (False, 12, 8)
    encoder = build_clip_encoder(weights, (224, 224), 16, 77)
    images, ids = _inputs()
    _assert_same(_ours(encoder, images, ids), _open_clip_features(model, images, ids))
    assert read_open_clip("ViT-B-16:openai").quick_gelu  # OpenAI's weights use QuickGELU
    assert read_open_clip("ViT-B-16").origin.startswith("open_clip ViT-B-16 (openai,")  # the first listed tag


def test_open_clip_vit_l_14_shapes():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-L-14", pretrained=None)
    config = open_clip.get_model_config("ViT-L-14")
    assert (config["vision_cfg"]["width"] // 64, config["text_cfg"]["heads"]) == (16, 12)
    encoder = build_clip_encoder(ClipWeights(model.state_dict(), "ViT-L-14", False, 16, 12), (224, 224), 14, 77)
    images, ids = _inputs()
    _assert_same(_ours(encoder, images[:1], ids), _open_clip_features(model, images[:1], ids))


def test_open_clip_download_failures_and_bad_names_are_one_line(monkeypatch):
    def offline(cfg, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nlong traceback text")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(CheckpointError, match=r"cannot download open_clip ViT-B-16 \(laion2b_s34b_b88k\): Failed "
                       r"to resolve 'huggingface.co'; offline\? .* --pretrain_choice open_clip:PATH$"):
        clip_weights("open_clip:ViT-B-16:laion2b_s34b_b88k")
    with pytest.raises(CheckpointError, match="neither a file nor an open_clip model name"):
        clip_weights("open_clip:ViT-Q-99")
    with pytest.raises(CheckpointError, match="has no tag 'nope' for ViT-B-16; it has openai, laion400m_e31"):
        clip_weights("open_clip:ViT-B-16:nope")
    for name, setting in (("ViT-B-16-SigLIP", "custom_text"), ("ViT-L-14-CLIPA", "no_ln_pre"),
                          ("coca_ViT-B-32", "custom_text")):
        with pytest.raises(CheckpointError, match=f"open_clip {name} has {setting} = .*not OpenAI's CLIP layout"):
            clip_weights(f"open_clip:{name}")


# ---------------------------------------------------------------- Hugging Face
def _hf_model(act: str = "quick_gelu", size: str = "tiny") -> CLIPModel:
    if size == "tiny":
        vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
        text = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        projection = 32
    else:  # openai/clip-vit-base-patch16's shapes
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
        projection = 512
    vision.update(image_size=224, patch_size=16, hidden_act=act)
    text.update(vocab_size=49408, max_position_embeddings=77, hidden_act=act, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=0)
    torch.manual_seed(0)
    return CLIPModel(HFConfig(text_config=text, vision_config=vision, projection_dim=projection)).eval()


@torch.no_grad()
def _hf_features(model, images, ids) -> tuple[torch.Tensor, torch.Tensor]:
    image, text = model.get_image_features(pixel_values=images), model.get_text_features(input_ids=ids)
    return getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)


@pytest.mark.parametrize("act, size", [("quick_gelu", "tiny"), ("gelu", "tiny"), ("quick_gelu", "ViT-B/16")])
def test_a_hugging_face_clip_gives_transformers_features(tmp_path, act, size):
    model = _hf_model(act, size)
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    encoder = build_clip_encoder(clip_weights(f"hf:{tmp_path / 'hf'}"), (224, 224), 16, 77)
    assert encoder.config.quick_gelu == (act == "quick_gelu")
    images, ids = _inputs()
    _assert_same(_ours(encoder, images, ids), _hf_features(model, images, ids))


def test_hugging_face_folders_that_do_not_fit_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        clip_weights(f"hf:{tmp_path}")
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "relu"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"activation \['quick_gelu', 'relu'\] is not supported"):
        clip_weights(f"hf:{tmp_path / 'hf'}")
    from safetensors.torch import load_file, save_file
    model.save_pretrained(tmp_path / "extra")
    tensors = load_file(tmp_path / "extra" / "model.safetensors")
    tensors["vision_model.head.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "extra" / "model.safetensors")
    with pytest.raises(CheckpointError, match="tensor vision_model.head.weight has no place in a CLIP encoder"):
        clip_weights(f"hf:{tmp_path / 'extra'}")


# ---------------------------------------------------------------- at our resolution, in a run
def test_other_backbones_are_resized_to_384x128_like_openai_files(tmp_path):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    weights = clip_weights(f"hf:{tmp_path / 'hf'}")
    encoder = build_clip_encoder(weights, (384, 128), 16, 77)
    assert encoder.visual.grid_size == (24, 8)
    torch.testing.assert_close(encoder.visual.positional_embedding.data,
                               resize_pos_embed(weights.state["visual.positional_embedding"], (24, 8)))
    with pytest.raises(CheckpointError, match="text_length 64 differs from the context length 77"):
        build_clip_encoder(weights, (384, 128), 16, 64)


def test_a_run_from_a_hugging_face_backbone_is_evaluated_without_it(toy_root, tmp_path):
    """The run config keeps the heads and the activation, so test.py rebuilds the same encoder."""
    model = _hf_model("gelu")
    model.save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    best = train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), "--root_dir", str(toy_root),
                             "--pretrain_choice", f"hf:{tmp_path / 'hf'}", "--img_size", "64", "32",
                             "--text_length", "77", "--batch_size", "16", "--num_workers", "0", "--num_epoch", "1",
                             "--output_dir", str(run)])
    saved = yaml.safe_load((run / "configs.yaml").read_text())["clip"]
    assert (saved["vision_heads"], saved["text_heads"], saved["quick_gelu"]) == (2, 4, False)
    (tmp_path / "hf" / "model.safetensors").unlink()  # test.py must not need the backbone any more
    results = test_entry.main(["--config_file", str(run / "configs.yaml")])
    assert results["t2i"] == pytest.approx(best["t2i"], abs=1e-4)


def test_clip_weights_with_heads_that_do_not_divide_the_width_are_refused():
    state = _tiny_open_clip(False).state_dict()
    with pytest.raises(CheckpointError, match="vision width 64 is not divisible by 3 heads"):
        build_clip_encoder(ClipWeights(state, "x", False, 3, 4), (224, 224), 16, 77)
