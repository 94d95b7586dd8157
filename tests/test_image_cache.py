"""The decoded-image cache: same tensors as the PIL pipeline, rebuilt only when the data changes."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

import train as train_entry
from datasets import build_dataset
from datasets.build import build_eval_loaders, build_train_loader
from datasets.cache import DecodedImageCache
from datasets.toy import generate_toy_dataset
from test_end_to_end import REPO, RUN_REPORT_KEYS, TINY
from utils.options import defaults
from utils.simple_tokenizer import SimpleTokenizer


@pytest.fixture()
def toy(tmp_path):
    root = tmp_path / "data"
    generate_toy_dataset(root, num_train_ids=6, num_val_ids=1, num_test_ids=4, image_size=(60, 30))
    return root, build_dataset("CUHK-PEDES", root)


def _cfg(**overrides):
    return SimpleNamespace(**{**defaults(), "img_size": [48, 24], "num_workers": 0, "test_batch_size": 4,
                              "batch_size": 4, **overrides})


def test_cached_and_uncached_pipelines_give_the_same_tensors(toy):
    root, dataset = toy
    tokenizer = SimpleTokenizer()
    plain, _ = build_eval_loaders(_cfg(), dataset, tokenizer)
    cached, _ = build_eval_loaders(_cfg(image_cache=True), dataset, tokenizer)
    for (_, pa, xa, _), (_, pb, xb, _) in zip(plain, cached):
        assert torch.equal(pa, pb)
        assert xa.shape == xb.shape == (len(pa), 3, 48, 24)
        assert torch.allclose(xa, xb, atol=1e-6)
    assert (root / "CUHK-PEDES/.cache/test_48x24.u8").is_file()


def test_cached_training_batches_have_the_right_shape(toy):
    _, dataset = toy
    cfg = _cfg(image_cache=True, img_aug=True, erase_value="clip_mean")
    batch = next(iter(build_train_loader(cfg, dataset, SimpleTokenizer(), set(), torch.Generator())))
    assert batch["images"].shape == (4, 3, 48, 24) and batch["images"].dtype == torch.float32


def test_cache_is_reused_and_rebuilt_when_the_annotations_change(toy, tmp_path):
    root, dataset = toy
    paths, annotation = dataset.test.img_paths, dataset.annotation_file
    target = tmp_path / "c" / "test.u8"
    first = DecodedImageCache(paths, (48, 24), target, annotation)
    stamp = os.stat(target).st_mtime_ns
    DecodedImageCache(paths, (48, 24), target, annotation)
    assert os.stat(target).st_mtime_ns == stamp  # reused
    entries = json.loads(annotation.read_text())
    entries[-1]["captions"].append("one more caption")
    annotation.write_text(json.dumps(entries))
    rebuilt = DecodedImageCache(paths, (48, 24), target, annotation)
    assert os.stat(target).st_mtime_ns != stamp
    assert torch.equal(first[0], rebuilt[0]) and first[0].dtype == torch.uint8


def test_unreadable_image_in_the_cache_reads_as_none(toy, tmp_path):
    _, dataset = toy
    paths = list(dataset.test.img_paths)
    with open(paths[1], "wb") as f:
        f.write(b"not an image")
    cache = DecodedImageCache(paths, (48, 24), tmp_path / "t.u8", dataset.annotation_file)
    assert cache[1] is None and cache[0].shape == (3, 48, 24)


def test_training_with_the_cache(toy, tmp_path):
    root, _ = toy
    best = train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(root),
                             "--output_dir", str(tmp_path / "run"), "--num_epoch", "1", "--image_cache",
                             "--img_aug"])
    assert set(best) == RUN_REPORT_KEYS
