"""Shared fixtures: tiny OpenAI-format CLIP checkpoints, toy benchmark folders, the tokenizer.

Everything is generated locally (no network); sizes are tiny so every test runs on CPU in well
under a second or two.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

# Entries of OpenAI's JIT archives that are not weights (IRRA's model/clip_model.py loader skips them).
JIT_META = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}
OPENAI_VOCAB = 49408
OPENAI_CONTEXT = 77


# ----------------------------------------------------------------------------------------------
# OpenAI-format CLIP checkpoints
# ----------------------------------------------------------------------------------------------
def _block_shapes(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one CLIP residual block in OpenAI's key format (as in OpenAI's ViT-B/16 state dict)."""
    return {
        f"{prefix}.attn.in_proj_weight": (3 * width, width),
        f"{prefix}.attn.in_proj_bias": (3 * width,),
        f"{prefix}.attn.out_proj.weight": (width, width),
        f"{prefix}.attn.out_proj.bias": (width,),
        f"{prefix}.ln_1.weight": (width,),
        f"{prefix}.ln_1.bias": (width,),
        f"{prefix}.mlp.c_fc.weight": (4 * width, width),
        f"{prefix}.mlp.c_fc.bias": (4 * width,),
        f"{prefix}.mlp.c_proj.weight": (width, 4 * width),
        f"{prefix}.mlp.c_proj.bias": (width,),
        f"{prefix}.ln_2.weight": (width,),
        f"{prefix}.ln_2.bias": (width,),
    }


def openai_state_dict(vision_width: int = 64, vision_layers: int = 1, patch: int = 16, grid: int = 14,
                      text_width: int = 64, text_layers: int = 1, embed_dim: int = 32,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """A random-weight CLIP state dict with OpenAI's exact keys and shapes (incl. logit_scale)."""
    shapes: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (vision_width, 3, patch, patch),
        "visual.class_embedding": (vision_width,),
        "visual.positional_embedding": (1 + grid * grid, vision_width),
        "visual.ln_pre.weight": (vision_width,),
        "visual.ln_pre.bias": (vision_width,),
    }
    for i in range(vision_layers):
        shapes.update(_block_shapes(f"visual.transformer.resblocks.{i}", vision_width))
    shapes.update({
        "visual.ln_post.weight": (vision_width,),
        "visual.ln_post.bias": (vision_width,),
        "visual.proj": (vision_width, embed_dim),
        "token_embedding.weight": (OPENAI_VOCAB, text_width),
        "positional_embedding": (OPENAI_CONTEXT, text_width),
    })
    for i in range(text_layers):
        shapes.update(_block_shapes(f"transformer.resblocks.{i}", text_width))
    shapes.update({
        "ln_final.weight": (text_width,),
        "ln_final.bias": (text_width,),
        "text_projection": (text_width, embed_dim),
        "logit_scale": (),
    })
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        # Small-ish values keep the forward pass finite; every tensor is distinct random data so
        # that a mis-routed tensor would be detected.
        state[key] = torch.randn(shape, generator=gen) * 0.05
    state["logit_scale"] = torch.tensor(4.6052)
    return state


class _Holder(nn.Module):
    """A plain container; scripted, its state dict reproduces the dotted key names."""

    def forward(self) -> int:  # pragma: no cover - never called
        return 0


def _scripted_archive(state: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    root = _Holder()
    for key, value in state.items():
        *modules, leaf = key.split(".")
        node = root
        for name in modules:
            if name not in node._modules:
                node.add_module(name, _Holder())
            node = node._modules[name]
        node.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    for key, value in JIT_META.items():
        root.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(root)


def make_openai_checkpoint(path, fmt: str = "state_dict", vision_width: int = 64, vision_layers: int = 1,
                           patch: int = 16, grid: int = 14, text_width: int = 64, text_layers: int = 1,
                           embed_dim: int = 32, seed: int = 0, wrap: str | None = None,
                           drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Write a tiny random CLIP at ``path`` and return its tensors (OpenAI key names).

    ``fmt='jit'`` writes a TorchScript archive whose ``state_dict()`` holds the same tensors plus
    OpenAI's meta entries ``input_resolution``/``context_length``/``vocab_size``; ``fmt='state_dict'``
    a ``torch.save`` file. ``wrap='state_dict'`` saves ``{'state_dict': {'module.'+k: v}}``,
    ``wrap='model'`` saves ``{'model': state}``. ``drop`` removes keys before writing.
    """
    state = openai_state_dict(vision_width, vision_layers, patch, grid, text_width, text_layers,
                              embed_dim, seed)
    for key in drop:
        del state[key]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jit":
        if wrap is not None:
            raise ValueError("a JIT archive cannot be wrapped")
        _scripted_archive(state).save(str(path))
    elif fmt == "state_dict":
        if wrap is None:
            payload = state
        elif wrap == "state_dict":
            payload = {"state_dict": {"module." + k: v for k, v in state.items()}}
        elif wrap == "model":
            payload = {"model": dict(state)}
        else:
            raise ValueError(f"unknown wrap {wrap!r}")
        torch.save(payload, path)
    else:
        raise ValueError(f"unknown fmt {fmt!r}")
    return state


@pytest.fixture
def openai_checkpoint(tmp_path):
    """Factory: ``openai_checkpoint(name='ckpt.pt', **kwargs) -> (path, state)``."""
    counter = {"n": 0}

    def factory(name: str | None = None, **kwargs):
        counter["n"] += 1
        path = tmp_path / "ckpts" / (name or f"ckpt{counter['n']}.pt")
        state = make_openai_checkpoint(path, **kwargs)
        return path, state

    return factory


# ----------------------------------------------------------------------------------------------
# Tokenizer (loading the merges takes ~0.2 s: share it)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tokenizer():
    from utils.simple_tokenizer import SimpleTokenizer
    return SimpleTokenizer()


# ----------------------------------------------------------------------------------------------
# Toy benchmarks in their published on-disk formats
# ----------------------------------------------------------------------------------------------
WORDS = ("man woman red blue black white shirt jacket pants shorts bag shoes hair long short "
         "wearing carrying holding walking with a the and").split()


def _caption(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))).capitalize() + "."


def _write_image(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(24, 12, 3), dtype=np.uint8)  # H=24, W=12
    Image.fromarray(pixels).save(path)


def _write_dataset(root: Path, folder: str, json_name: str, entries: list[dict], path_field: str,
                   rng: np.random.Generator) -> list[dict]:
    base = root / folder
    for entry in entries:
        _write_image(base / "imgs" / entry[path_field], rng)
    (base / json_name).write_text(json.dumps(entries, indent=1))
    return entries


def _stats(entries: list[dict]) -> dict[str, tuple[int, int, int]]:
    """(ids, images, captions) per split, counted directly from the annotation list."""
    out = {}
    for split in ("train", "val", "test"):
        chosen = [e for e in entries if (e["split"] if e["split"] in ("train", "test") else "val") == split]
        out[split] = (len({e["id"] for e in chosen}), len(chosen), sum(len(e["captions"]) for e in chosen))
    return out


@pytest.fixture
def toy_benchmarks(tmp_path):
    """CUHK-PEDES, ICFG-PEDES and RSTPReid under one root, in their published formats.

    Returns a namespace with ``root``, ``annotations[name]`` (the written JSON lists) and
    ``counts[name][split] = (ids, images, captions)``.
    """
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    annotations = {}

    # CUHK-PEDES: 1-based ids, train/val/test, several captions per image, sub-folders, the
    # splits interleaved in the file (the image_id counter must count train images only).
    cuhk_layout = [  # (split, id, number of captions)
        ("train", 1, 2), ("train", 1, 2), ("test", 12, 2), ("train", 2, 3), ("val", 8, 2),
        ("train", 3, 2), ("train", 3, 1), ("val", 8, 2), ("val", 9, 2), ("test", 12, 2),
        ("test", 13, 2), ("train", 4, 2), ("test", 14, 2),
    ]
    cuhk = []
    for n, (split, pid, ncap) in enumerate(cuhk_layout):
        captions = [_caption(rng) for _ in range(ncap)]
        cuhk.append({"split": split, "captions": captions,
                     "file_path": f"cam_{'ab'[n % 2]}/{n:04d}.png", "id": pid,
                     "processed_tokens": [c.lower().rstrip(".").split() for c in captions]})
    annotations["CUHK-PEDES"] = _write_dataset(root, "CUHK-PEDES", "reid_raw.json", cuhk, "file_path", rng)

    # ICFG-PEDES: 0-based ids as is, train/test only, one caption per image, JPEG images.
    icfg_layout = [("train", 0), ("train", 0), ("train", 1), ("test", 40), ("train", 2),
                   ("train", 1), ("test", 40), ("test", 41), ("train", 2), ("test", 42)]
    icfg = []
    for n, (split, pid) in enumerate(icfg_layout):
        icfg.append({"split": split, "captions": [_caption(rng)],
                     "file_path": f"{split}/{pid:04d}/{pid:04d}_{n:03d}.jpg", "id": pid,
                     "processed_tokens": [["x"]]})
    annotations["ICFG-PEDES"] = _write_dataset(root, "ICFG-PEDES", "ICFG-PEDES.json", icfg, "file_path", rng)

    # RSTPReid: ids as is, img_path instead of file_path, two captions per image.
    rstp_layout = [("train", 0), ("train", 1), ("train", 0), ("val", 7), ("train", 2),
                   ("test", 9), ("val", 7), ("test", 10), ("train", 1), ("test", 9)]
    rstp = []
    for n, (split, pid) in enumerate(rstp_layout):
        rstp.append({"id": pid, "img_path": f"{pid:04d}_c{n % 5 + 1}_{n:04d}.jpg",
                     "captions": [_caption(rng), _caption(rng)], "split": split})
    annotations["RSTPReid"] = _write_dataset(root, "RSTPReid", "data_captions.json", rstp, "img_path", rng)

    counts = {name: _stats(entries) for name, entries in annotations.items()}
    return SimpleNamespace(root=root, annotations=annotations, counts=counts,
                           path_fields={"CUHK-PEDES": "file_path", "ICFG-PEDES": "file_path",
                                        "RSTPReid": "img_path"},
                           json_names={"CUHK-PEDES": "reid_raw.json", "ICFG-PEDES": "ICFG-PEDES.json",
                                       "RSTPReid": "data_captions.json"})


# ----------------------------------------------------------------------------------------------
# Tiny model configs
# ----------------------------------------------------------------------------------------------
TINY_MODEL = dict(pretrain_choice="none", img_size=[32, 16], vision_patch_size=8, stride_size=8,
                  vision_width=64, vision_layers=1, text_width=64, text_layers=1, embed_dim=64,
                  cmt_depth=1, vocab_size=49408, text_length=77)


def tiny_model_config(**overrides) -> SimpleNamespace:
    """The default config with a tiny from-scratch encoder (and any overrides)."""
    from utils.options import defaults
    return SimpleNamespace(**{**defaults(), **TINY_MODEL, **overrides})


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """The generated toy CUHK-PEDES (16 training identities, 8 test identities), read-only."""
    from datasets.toy import generate_toy_dataset
    root = tmp_path_factory.mktemp("toy")
    generate_toy_dataset(root, num_train_ids=16, num_val_ids=2, num_test_ids=8, image_size=(48, 24))
    return root


def demo_config(root: Path, *flags: str) -> SimpleNamespace:
    """The resolved config of configs/demo.yaml with the tiny model, on ``root``, plus ``flags``."""
    from test_end_to_end import REPO, TINY
    from utils.options import build_parser, resolve
    args = ["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(root), *flags]
    return resolve(build_parser("t").parse_args(args))


@pytest.fixture
def custom():
    """The heads of ``custom_heads.py`` (defined only in the test suite), registered for one test."""
    from custom_heads import registered
    with registered():
        yield


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encoder_output(image_global: torch.Tensor, text_global: torch.Tensor):
    """An ``EncoderOutput`` holding given global features (one token each), for testing heads that
    read only the global features."""
    from model.clip import ImageOutput, TextOutput
    from model.heads import EncoderOutput
    ids = torch.full((len(text_global), 1), 49407)
    return EncoderOutput(ImageOutput(image_global[:, None], image_global),
                         TextOutput(ids, text_global[:, None], text_global))


def train_until_killed_after_epoch_one(monkeypatch, train_args: list[str]) -> None:
    """Run train.py's main on ``train_args`` as a process that dies right after epoch 1's checkpoint."""
    import processor.processor as processor
    import train as train_entry
    real_save = processor.save_training_state

    def save_then_crash(path, model, optimizer, scheduler, epoch, *rest):
        real_save(path, model, optimizer, scheduler, epoch, *rest)
        if epoch == 1:
            raise KeyboardInterrupt

    from utils.errors import Interrupted
    with monkeypatch.context() as patch:
        patch.setattr(processor, "save_training_state", save_then_crash)
        with pytest.raises(Interrupted, match="interrupted in epoch 2: last.pth holds epoch 1; continue with: "
                           "python train.py .* --resume"):
            train_entry.main(train_args)
