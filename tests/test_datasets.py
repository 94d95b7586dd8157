"""Dataset builders, identity sampler, transforms, MLM masking, torch datasets and loaders
(as in anosorae/IRRA @ cfc2378: datasets/build.py, datasets/sampler.py, datasets/bases.py)."""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import DatasetError, build_dataset
from datasets.bases import DATASETS
from datasets.build import (ImageTextDataset, ShardedBatchSampler, build_eval_loaders, build_train_loader,
                            collate)
from datasets.captions import MaskingConfig, mask_tokens
from datasets.fields import MaskedCaption
from datasets.sampler import RandomIdentitySampler
from datasets.transforms import build_transforms
from utils.errors import ConfigError
from utils.options import defaults
from utils.simple_tokenizer import tokenize

MASK_ID, SOT_ID, EOT_ID = 49405, 49406, 49407
# OpenAI CLIP's normalisation constants (as in IRRA datasets/build.py), not imported from the code under test.
REF_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
REF_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# (ids, images, captions) per split, counted by hand from the fixture's layouts in conftest.py.
EXPECTED_STATS = {
    "CUHK-PEDES": {"train": (4, 6, 12), "val": (2, 3, 6), "test": (3, 4, 8)},
    "ICFG-PEDES": {"train": (3, 6, 6), "val": (0, 0, 0), "test": (3, 4, 4)},
    "RSTPReid": {"train": (3, 5, 10), "val": (1, 2, 4), "test": (2, 3, 6)},
}
NAMES = list(EXPECTED_STATS)


def _cfg(**overrides):
    return SimpleNamespace(**{**defaults(), "num_workers": 0, **overrides})


def _split_of(entry):
    return entry["split"] if entry["split"] in ("train", "test") else "val"


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------
def test_registry_has_the_three_benchmarks():
    assert {"CUHK-PEDES", "ICFG-PEDES", "RSTPReid"} <= set(DATASETS)


@pytest.mark.parametrize("name", NAMES)
def test_statistics(toy_benchmarks, name):
    ds = build_dataset(name, toy_benchmarks.root)
    assert toy_benchmarks.counts[name] == EXPECTED_STATS[name]  # fixture sanity
    ids, images, captions = EXPECTED_STATS[name]["train"]
    assert ds.num_classes == ids
    assert len({r[1] for r in ds.train}) == images
    assert len(ds.train) == captions
    for split in ("val", "test"):
        data = getattr(ds, split)
        ids, images, captions = EXPECTED_STATS[name][split]
        assert len(set(data.image_pids)) == ids
        assert len(data.image_pids) == len(data.img_paths) == images
        assert len(data.caption_pids) == len(data.captions) == captions
    table = ds.statistics_table()
    rows = {row[0]: tuple(row[1:]) for row in table.rows}
    assert rows == {split: EXPECTED_STATS[name][split] for split in ("train", "val", "test")}


@pytest.mark.parametrize("name", NAMES)
def test_train_records(toy_benchmarks, name):
    ds = build_dataset(name, toy_benchmarks.root)
    field = toy_benchmarks.path_fields[name]
    offset = 1 if name == "CUHK-PEDES" else 0  # CUHK ids are 1-based
    expected = []
    image_id = 0
    for entry in toy_benchmarks.annotations[name]:
        if entry["split"] != "train":
            continue
        path = str(Path(toy_benchmarks.root) / name / "imgs" / entry[field])
        expected.extend((entry["id"] - offset, image_id, path, c) for c in entry["captions"])
        image_id += 1
    assert [tuple(r) for r in ds.train] == expected
    pids = sorted({r[0] for r in ds.train})
    assert pids == list(range(ds.num_classes))  # 0-based and contiguous
    for pid, image_id, path, caption in ds.train:
        assert isinstance(pid, int) and isinstance(image_id, int)
        assert Path(path).is_file()
        assert Path(path).is_relative_to(Path(toy_benchmarks.root) / name / "imgs")
        assert isinstance(caption, str) and caption


def test_cuhk_train_pids_shifted_by_one(toy_benchmarks):
    ds = build_dataset("CUHK-PEDES", toy_benchmarks.root)
    raw = [e["id"] for e in toy_benchmarks.annotations["CUHK-PEDES"] if e["split"] == "train"]
    assert min(raw) == 1
    assert {r[0] for r in ds.train} == {i - 1 for i in raw} == {0, 1, 2, 3}


@pytest.mark.parametrize("name", NAMES)
def test_eval_splits(toy_benchmarks, name):
    ds = build_dataset(name, toy_benchmarks.root)
    field = toy_benchmarks.path_fields[name]
    for split in ("val", "test"):
        entries = [e for e in toy_benchmarks.annotations[name] if _split_of(e) == split]
        data = getattr(ds, split)
        # gallery: one entry per image, raw pids (not shifted, even for CUHK)
        assert list(data.image_pids) == [e["id"] for e in entries]
        assert list(data.img_paths) == [str(Path(toy_benchmarks.root) / name / "imgs" / e[field])
                                        for e in entries]
        assert all(Path(p).is_file() for p in data.img_paths)
        # queries: one entry per caption, flattened in annotation order
        assert list(data.captions) == [c for e in entries for c in e["captions"]]
        assert list(data.caption_pids) == [e["id"] for e in entries for _ in e["captions"]]


def test_cuhk_test_pids_are_raw(toy_benchmarks):
    ds = build_dataset("CUHK-PEDES", toy_benchmarks.root)
    assert set(ds.test.image_pids) == {12, 13, 14}
    assert set(ds.val.image_pids) == {8, 9}


def test_unknown_split_values_are_refused(toy_benchmarks):
    path = toy_benchmarks.root / "RSTPReid" / "data_captions.json"
    entries = json.loads(path.read_text())
    entries[3]["split"] = "validation"
    path.write_text(json.dumps(entries))
    with pytest.raises(DatasetError, match=r"1 malformed entry; first: entry 3 \(.*\): split 'validation' is not "
                       "one of train, val, test"):
        build_dataset("RSTPReid", toy_benchmarks.root)


def test_icfg_accepts_readme_file_name(toy_benchmarks):
    base = toy_benchmarks.root / "ICFG-PEDES"
    (base / "ICFG-PEDES.json").rename(base / "ICFG_PEDES.json")
    ds = build_dataset("ICFG-PEDES", toy_benchmarks.root)
    assert len(ds.train) == 6 and ds.num_classes == 3
    assert len(ds.test.captions) == 4


def test_rstpreid_uses_img_path(toy_benchmarks):
    ds = build_dataset("RSTPReid", toy_benchmarks.root)
    first = toy_benchmarks.annotations["RSTPReid"][0]
    assert ds.train[0][2].endswith(first["img_path"])
    assert ds.train[0][3] == first["captions"][0]
    assert ds.train[1][3] == first["captions"][1]
    assert ds.train[0][1] == ds.train[1][1] == 0


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_missing_root_folder(tmp_path, name):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as info:
        build_dataset(name, root)
    assert str(root / name) in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_missing_annotation_file(toy_benchmarks, name):
    (toy_benchmarks.root / name / toy_benchmarks.json_names[name]).unlink()
    with pytest.raises(DatasetError) as info:
        build_dataset(name, toy_benchmarks.root)
    assert toy_benchmarks.json_names[name] in str(info.value)


def test_missing_icfg_annotation_names_both_spellings(toy_benchmarks):
    (toy_benchmarks.root / "ICFG-PEDES" / "ICFG-PEDES.json").unlink()
    with pytest.raises(DatasetError) as info:
        build_dataset("ICFG-PEDES", toy_benchmarks.root)
    assert "ICFG-PEDES.json" in str(info.value) and "ICFG_PEDES.json" in str(info.value)


def test_malformed_json(toy_benchmarks):
    path = toy_benchmarks.root / "CUHK-PEDES" / "reid_raw.json"
    # the error is on line 3, column 5: a bare word where a key string is expected
    path.write_text('[\n  {"split": "train",\n    oops: 1}\n]\n')
    with pytest.raises(DatasetError) as info:
        build_dataset("CUHK-PEDES", toy_benchmarks.root)
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message
    assert "column 5" in message


@pytest.mark.parametrize("name,index,key", [
    ("CUHK-PEDES", 2, "captions"),
    ("CUHK-PEDES", 0, "id"),
    ("ICFG-PEDES", 5, "file_path"),
    ("RSTPReid", 4, "img_path"),
    ("RSTPReid", 7, "split"),
])
def test_entry_missing_key(toy_benchmarks, name, index, key):
    path = toy_benchmarks.root / name / toy_benchmarks.json_names[name]
    entries = json.loads(path.read_text())
    del entries[index][key]
    path.write_text(json.dumps(entries))
    with pytest.raises(DatasetError) as info:
        build_dataset(name, toy_benchmarks.root)
    message = str(info.value)
    assert f"entry {index}" in message
    assert key in message
    assert str(path) in message


def test_rstpreid_file_path_instead_of_img_path_is_rejected(toy_benchmarks):
    path = toy_benchmarks.root / "RSTPReid" / "data_captions.json"
    entries = json.loads(path.read_text())
    entries = [{**{k: v for k, v in e.items() if k != "img_path"}, "file_path": e["img_path"]}
               for e in entries]
    path.write_text(json.dumps(entries))
    with pytest.raises(DatasetError) as info:
        build_dataset("RSTPReid", toy_benchmarks.root)
    assert "img_path" in str(info.value) and "entry 0" in str(info.value)


def test_annotation_not_a_list(toy_benchmarks):
    path = toy_benchmarks.root / "RSTPReid" / "data_captions.json"
    path.write_text(json.dumps({"split": "train"}))
    with pytest.raises(DatasetError) as info:
        build_dataset("RSTPReid", toy_benchmarks.root)
    assert str(path) in str(info.value)


def test_non_contiguous_train_ids(toy_benchmarks):
    path = toy_benchmarks.root / "ICFG-PEDES" / "ICFG-PEDES.json"
    entries = json.loads(path.read_text())
    for e in entries:
        if e["split"] == "train" and e["id"] == 1:
            e["id"] = 5  # train ids now {0, 2, 5}
    path.write_text(json.dumps(entries))
    with pytest.raises(DatasetError, match="3 distinct ids from 0 to 5, id 1 is absent"):
        build_dataset("ICFG-PEDES", toy_benchmarks.root)


def test_unknown_dataset_name_lists_known(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_dataset("Market-1501", tmp_path)
    message = str(info.value)
    assert "Market-1501" in message
    for name in NAMES:
        assert name in message


# ----------------------------------------------------------------------------------------------
# Identity sampler (IRRA datasets/sampler.py RandomIdentitySampler)
# ----------------------------------------------------------------------------------------------
def _seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# pid -> number of samples: some pids have fewer than K (drawn with replacement), some odd counts
SAMPLER_PIDS = [p for p, n in enumerate([1, 2, 3, 4, 5, 6, 7, 2, 9]) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identity_sampler_batches(seed):
    _seed(seed)
    pids = list(SAMPLER_PIDS)
    random.Random(seed).shuffle(pids)  # indices of one pid are not contiguous
    sampler = RandomIdentitySampler(pids, batch_size=8, num_instances=2, seed=seed)
    order = list(iter(sampler))
    assert order and len(order) % 8 == 0
    assert all(isinstance(i, int) and 0 <= i < len(pids) for i in order)
    counts = Counter(pids)
    for b in range(0, len(order), 8):
        batch = [pids[i] for i in order[b:b + 8]]
        assert len(set(batch)) == 4                         # P = 8 // 2 distinct pids
        assert all(c == 2 for c in Counter(batch).values())  # each exactly K = 2 times
        for k in range(0, 8, 2):                            # chunks of K are consecutive
            assert batch[k] == batch[k + 1]
    used = Counter(order)
    for index, n in used.items():
        if counts[pids[index]] >= 2:
            assert n == 1  # without replacement when a pid has at least K samples
    # a pid is used for at most floor(max(n, K) / K) chunks
    per_pid = Counter(pids[i] for i in order)
    for pid, n in per_pid.items():
        assert n <= max(counts[pid], 2) // 2 * 2
    assert len(sampler) == len(order)  # __len__ counts what this epoch yields


def test_identity_sampler_single_sample_pid_is_repeated():
    pids = [0, 1, 1, 2, 2, 3, 3]  # pid 0 has one sample (< K)
    seen_pid0 = False
    for seed in range(10):
        _seed(seed)
        order = list(RandomIdentitySampler(pids, batch_size=4, num_instances=2, seed=seed))
        for b in range(0, len(order), 4):
            chunk_pids = [pids[i] for i in order[b:b + 4]]
            assert len(set(chunk_pids)) == 2
        if 0 in order:
            seen_pid0 = True
            assert order.count(0) == 2
            pos = order.index(0)
            assert order[pos + 1] == 0
    assert seen_pid0


def test_identity_sampler_deterministic_under_seed():
    a = RandomIdentitySampler(SAMPLER_PIDS, 8, 2, seed=7)
    b = RandomIdentitySampler(SAMPLER_PIDS, 8, 2, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)  # a new order each epoch, from seed + epoch alone
    b.set_epoch(1)
    assert list(a) == list(b)


def test_identity_sampler_ranks_split_each_global_batch():
    full = list(RandomIdentitySampler(SAMPLER_PIDS, 8, 2, seed=3))
    ranks = [list(RandomIdentitySampler(SAMPLER_PIDS, 8, 2, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(full) // 2
    rebuilt = [i for b in range(0, len(full) // 2, 4) for r in (0, 1) for i in ranks[r][b:b + 4]]
    assert rebuilt == full  # rank 0 takes the first half of every global batch, rank 1 the second


def test_identity_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError):
        RandomIdentitySampler(SAMPLER_PIDS, batch_size=6, num_instances=4)
    with pytest.raises(ValueError):
        RandomIdentitySampler([0, 0, 1, 1], batch_size=8, num_instances=2)  # 2 pids < P = 4


# ----------------------------------------------------------------------------------------------
# Transforms (IRRA datasets/build.py build_transforms)
# ----------------------------------------------------------------------------------------------
COLOUR = (200, 30, 90)


def _solid(colour=COLOUR, size=(12, 24)):
    return Image.new("RGB", size, colour)  # PIL size is (W, H)


def _normalised(rgb):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, REF_CLIP_MEAN, REF_CLIP_STD)])


def test_test_transform_shape_values_and_determinism():
    t = build_transforms((384, 128), is_train=False)
    out = t(_solid())
    assert out.shape == (3, 384, 128)
    assert out.dtype == torch.float32
    expected = _normalised(COLOUR)[:, None, None].expand(3, 384, 128)
    assert torch.allclose(out, expected, atol=1e-5)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (24, 12, 3), dtype=np.uint8))
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(123)
    b = t(img)
    assert torch.equal(a, b)


def test_test_transform_does_not_keep_aspect_ratio():
    # a 100x100 image with a left red half and right blue half: the stretched output keeps the
    # split at column 64 of 128
    img = Image.new("RGB", (100, 100), (255, 0, 0))
    img.paste((0, 0, 255), (50, 0, 100, 100))
    out = build_transforms((384, 128), is_train=False)(img)
    red, blue = _normalised((255, 0, 0)), _normalised((0, 0, 255))
    assert out.shape == (3, 384, 128)
    assert torch.allclose(out[:, 200, 10], red, atol=1e-5)
    assert torch.allclose(out[:, 200, 120], blue, atol=1e-5)


def test_train_transform_without_aug_flips():
    img = Image.new("RGB", (12, 24), (255, 0, 0))
    img.paste((0, 0, 255), (6, 0, 12, 24))
    t = build_transforms((384, 128), is_train=True, aug=False)
    left_colours = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = t(img)
        assert out.shape == (3, 384, 128)
        left_colours.add("red" if out[2, 100, 5] < 0 else "blue")
    assert left_colours == {"red", "blue"}  # both flipped and unflipped outputs occur


@pytest.mark.parametrize("erase_value,fill", [("clip_mean", REF_CLIP_MEAN), ("zero", (0.0, 0.0, 0.0))])
def test_train_aug_random_erasing_fill(erase_value, fill):
    t = build_transforms((384, 128), is_train=True, aug=True, erase_value=erase_value)
    fill = torch.tensor(fill, dtype=torch.float32)
    body = _normalised(COLOUR)
    pad = _normalised((0, 0, 0))  # Pad(10) fills black
    erased_seen = 0
    for seed in range(40):
        torch.manual_seed(seed)
        random.seed(seed)
        out = t(_solid())
        assert out.shape == (3, 384, 128)
        is_fill = (out == fill[:, None, None]).all(0)
        is_body = torch.isclose(out, body[:, None, None], atol=1e-5).all(0)
        is_pad = torch.isclose(out, pad[:, None, None], atol=1e-5).all(0)
        assert (is_fill | is_body | is_pad).all()  # nothing else appears in the output
        if is_fill.any():
            erased_seen += 1
            rows = is_fill.any(1).nonzero().flatten()
            cols = is_fill.any(0).nonzero().flatten()
            box = is_fill[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all()  # one rectangle
            area = box.numel() / (384 * 128)
            assert 0.015 <= area <= 0.42  # scale (0.02, 0.4), up to rounding of the box sides
    assert 8 <= erased_seen <= 32  # p = 0.5 over 40 draws


def test_clip_mean_erasing_differs_from_zero_in_normalised_space():
    """IRRA's quirk: the CLIP-mean fill after Normalize is a light grey, not the mean colour."""
    t = build_transforms((384, 128), is_train=True, aug=True, erase_value="clip_mean")
    for seed in range(40):
        torch.manual_seed(seed)
        out = t(_solid())
        mask = (out == torch.tensor(REF_CLIP_MEAN)[:, None, None]).all(0)
        if mask.any():
            raw = out[:, mask] * torch.tensor(REF_CLIP_STD)[:, None] + torch.tensor(REF_CLIP_MEAN)[:, None]
            assert torch.allclose(raw[:, 0], torch.tensor([0.6108, 0.5775, 0.5208]), atol=1e-3)
            return
    pytest.fail("no erased sample in 40 seeds")


# ----------------------------------------------------------------------------------------------
# MLM masking (IRRA datasets/bases.py _build_random_masked_tokens_and_labels), tested against the analytic rates
# ----------------------------------------------------------------------------------------------
def _caption_ids(n: int, seed: int = 0) -> torch.Tensor:
    gen = np.random.default_rng(seed)
    content = gen.choice(np.arange(1, MASK_ID), size=n, replace=False)
    ids = torch.zeros(77, dtype=torch.long)
    ids[0] = SOT_ID
    ids[1:n + 1] = torch.as_tensor(content)
    ids[n + 1] = EOT_ID
    return ids


def _draws(tokenizer, ids, n_draws, seed):
    rng = random.Random(seed)
    cfg = MaskingConfig()
    masked = torch.empty(n_draws, 77, dtype=torch.long)
    labels = torch.empty(n_draws, 77, dtype=torch.long)
    for d in range(n_draws):
        masked[d], labels[d] = mask_tokens(ids, tokenizer, cfg, rng)
    return masked, labels


@pytest.mark.parametrize("n,n_draws,seed", [(1, 3000, 0), (3, 12000, 1), (10, 12000, 2), (25, 8000, 3)])
def test_mlm_masking_statistics(tokenizer, n, n_draws, seed):
    ids = _caption_ids(n, seed)
    masked, labels = _draws(tokenizer, ids, n_draws, seed)
    content = torch.zeros(77, dtype=torch.bool)
    content[1:n + 1] = True

    # SOT, EOT and padding never labelled, never altered
    assert (labels[:, ~content] == 0).all()
    assert (masked[:, ~content] == ids[~content]).all()
    # labels are the original ids where set
    lab = labels != 0
    assert (labels[lab] == ids.expand_as(labels)[lab]).all()
    # every caption has at least one label
    assert lab.any(1).all()
    # untouched unlabelled positions
    assert (masked[~lab] == ids.expand_as(masked)[~lab]).all()
    # random replacements are content ids 1..49404
    orig = ids.expand_as(masked)
    replaced = lab & (masked != MASK_ID) & (masked != orig)
    assert ((masked[replaced] >= 1) & (masked[replaced] <= 49404)).all()

    l_count = lab.sum(1).double()                        # labels per caption
    m_count = (lab & (masked == MASK_ID)).sum(1).double()  # mask tokens per caption
    r_count = replaced.sum(1).double()

    def within(samples, expected, k=4.0):
        se = samples.std() / math.sqrt(len(samples))
        return abs(samples.mean().item() - expected) <= k * max(se.item(), 1e-12)

    q = 0.85 ** n
    # P(label) per token = 0.15 + 0.85^n / n
    p_label = 0.15 + q / n
    assert within(l_count / n, p_label), ((l_count / n).mean().item(), p_label)
    # E[#mask] = 0.12 n + 0.85^n; E[#random] = 0.015 n (a replacement equal to the original is
    # counted as unchanged; probability 1/49404, negligible)
    assert within(m_count, 0.12 * n + q), (m_count.mean().item(), 0.12 * n + q)
    assert within(r_count, 0.015 * n), (r_count.mean().item(), 0.015 * n)
    # mask share among labels = (0.12 n + 0.85^n) / (0.15 n + 0.85^n), ratio estimator SE
    share = m_count.sum() / l_count.sum()
    expected_share = (0.12 * n + q) / (0.15 * n + q)
    se = (m_count - share * l_count).std() / math.sqrt(n_draws) / l_count.mean()
    assert abs(share.item() - expected_share) <= 4 * se.item() + 1e-9, (share.item(), expected_share)


def test_mlm_single_token_always_labelled(tokenizer):
    ids = _caption_ids(1)
    masked, labels = _draws(tokenizer, ids, 500, 11)
    assert (labels[:, 1] == ids[1]).all()
    assert (labels[:, 2:] == 0).all() and (labels[:, 0] == 0).all()


class _NeverSelect(random.Random):
    """An rng whose random() never falls below the selection probability."""

    def random(self):
        return 0.999


def test_forced_position_one_is_mask_token(tokenizer):
    ids = _caption_ids(12, seed=4)
    masked, labels = mask_tokens(ids, tokenizer, MaskingConfig(), _NeverSelect())
    expected_labels = torch.zeros(77, dtype=torch.long)
    expected_labels[1] = ids[1]
    assert torch.equal(labels, expected_labels)
    expected_masked = ids.clone()
    expected_masked[1] = MASK_ID
    assert torch.equal(masked, expected_masked)


def test_mask_tokens_does_not_modify_input(tokenizer):
    ids = _caption_ids(20, seed=5)
    before = ids.clone()
    for seed in range(20):
        mask_tokens(ids, tokenizer, MaskingConfig(), random.Random(seed))
    assert torch.equal(ids, before)


def test_mask_token_in_caption_is_not_eligible(tokenizer):
    ids = tokenize("a man wearing a jacket and blue jeans", tokenizer)
    pos = 5
    ids[pos] = MASK_ID  # an already masked position (e.g. another head's masked copy)
    masked, labels = _draws(tokenizer, ids, 2000, 6)
    assert (labels[:, pos] == 0).all()


def test_masking_deterministic_with_seeded_rng(tokenizer):
    ids = _caption_ids(15, seed=8)
    a = _draws(tokenizer, ids, 50, 21)
    b = _draws(tokenizer, ids, 50, 21)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_masking_config_rates_are_used(tokenizer):
    """prob 1 -> every content token labelled; mask_rate 1 -> all are <|mask|>."""
    ids = _caption_ids(9, seed=9)
    masked, labels = mask_tokens(ids, tokenizer, MaskingConfig(1.0, 1.0, 0.0), random.Random(0))
    assert torch.equal(labels[1:10], ids[1:10]) and (labels[10:] == 0).all() and labels[0] == 0
    assert (masked[1:10] == MASK_ID).all()
    masked, labels = mask_tokens(ids, tokenizer, MaskingConfig(1.0, 0.0, 1.0), random.Random(0))
    assert torch.equal(masked, ids) and torch.equal(labels[1:10], ids[1:10])


# ----------------------------------------------------------------------------------------------
# ImageTextDataset, collate, loaders
# ----------------------------------------------------------------------------------------------
def _train_set(toy_benchmarks, tokenizer, masking, aliasing):
    ds = build_dataset("CUHK-PEDES", toy_benchmarks.root)
    transform = build_transforms((384, 128), is_train=False)
    fields = [MaskedCaption(tokenizer, masking, aliasing)] if masking is not None else []
    return ds, ImageTextDataset(ds.train, transform, tokenizer, 77, fields)


def test_dataset_without_masking(toy_benchmarks, tokenizer):
    ds, data = _train_set(toy_benchmarks, tokenizer, None, False)
    assert len(data) == len(ds.train) == 12
    sample = data[3]
    pid, image_id, _, caption = ds.train[3]
    assert set(sample) == {"pids", "image_ids", "images", "caption_ids", "replaced"} and sample["replaced"] == 0
    assert sample["pids"] == pid and sample["image_ids"] == image_id
    assert sample["images"].shape == (3, 384, 128)
    assert torch.equal(sample["caption_ids"], tokenize(caption, tokenizer))


def test_dataset_global_sees_masked_caption(toy_benchmarks, tokenizer):
    ds, data = _train_set(toy_benchmarks, tokenizer, MaskingConfig(), True)
    random.seed(0)
    differs = 0
    for i in range(len(data)):
        sample = data[i]
        clean = tokenize(ds.train[i][3], tokenizer)
        assert torch.equal(sample["caption_ids"], sample["mlm_ids"])
        lab = sample["mlm_labels"] != 0
        assert lab.any()
        assert torch.equal(sample["mlm_labels"][lab], clean[lab])
        differs += int(not torch.equal(sample["caption_ids"], clean))
    assert differs > 0  # the global caption is really the masked one


def test_dataset_clean_caption(toy_benchmarks, tokenizer):
    ds, data = _train_set(toy_benchmarks, tokenizer, MaskingConfig(), False)
    random.seed(0)
    differs = 0
    for i in range(len(data)):
        sample = data[i]
        clean = tokenize(ds.train[i][3], tokenizer)
        assert torch.equal(sample["caption_ids"], clean)
        differs += int(not torch.equal(sample["mlm_ids"], clean))
        lab = sample["mlm_labels"] != 0
        assert torch.equal(sample["mlm_labels"][lab], clean[lab])
        # no shared memory: editing the masked copy leaves the clean caption alone
        sample["mlm_ids"].fill_(7)
        assert torch.equal(sample["caption_ids"], clean)
    assert differs > 0


def test_collate():
    batch = [
        {"pids": 3, "image_ids": 0, "images": torch.full((3, 4, 2), 1.0), "caption_ids": torch.arange(5)},
        {"pids": 5, "image_ids": 1, "images": torch.full((3, 4, 2), 2.0), "caption_ids": torch.arange(5) + 10},
    ]
    out = collate(batch)
    assert set(out) == set(batch[0])
    assert out["pids"].tolist() == [3, 5] and out["pids"].dtype == torch.int64
    assert out["image_ids"].tolist() == [0, 1] and out["image_ids"].dtype == torch.int64
    assert out["images"].shape == (2, 3, 4, 2)
    assert torch.equal(out["images"][1], batch[1]["images"])
    assert out["caption_ids"].shape == (2, 5)
    assert torch.equal(out["caption_ids"][1], batch[1]["caption_ids"])


def test_train_loader_random(toy_benchmarks, tokenizer):
    ds = build_dataset("RSTPReid", toy_benchmarks.root)
    cfg = _cfg(batch_size=4, MLM=True, img_aug=True, erase_value="clip_mean")
    loader = build_train_loader(cfg, ds, tokenizer, batch_fields=set(), generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert [len(b["pids"]) for b in batches] == [4, 4, 2]  # 10 captions, drop_last False
    first = batches[0]
    assert set(first) == {"pids", "image_ids", "images", "caption_ids", "mlm_ids", "mlm_labels", "replaced"}
    assert first["images"].shape == (4, 3, 384, 128)
    assert first["caption_ids"].shape == first["mlm_ids"].shape == first["mlm_labels"].shape == (4, 77)
    assert first["caption_ids"].dtype == torch.long
    all_pids = torch.cat([b["pids"] for b in batches]).tolist()
    assert sorted(all_pids) == sorted(r[0] for r in ds.train)  # one epoch = every caption once


def test_train_loader_no_masking_by_default(toy_benchmarks, tokenizer):
    ds = build_dataset("ICFG-PEDES", toy_benchmarks.root)
    loader = build_train_loader(_cfg(batch_size=3), ds, tokenizer, batch_fields=set())
    batch = next(iter(loader))
    assert set(batch) == {"pids", "image_ids", "images", "caption_ids", "replaced"}
    loader = build_train_loader(_cfg(batch_size=3), ds, tokenizer, batch_fields={"mlm_ids"})
    assert "mlm_labels" in next(iter(loader))


def test_train_loader_identity_sampler(toy_benchmarks, tokenizer):
    ds = build_dataset("CUHK-PEDES", toy_benchmarks.root)
    _seed(0)
    cfg = _cfg(batch_size=4, sampler="identity", num_instance=2)
    loader = build_train_loader(cfg, ds, tokenizer, batch_fields=set())
    batches = list(loader)
    assert batches
    for b in batches:
        pids = b["pids"].tolist()
        assert len(pids) == 4
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]


def test_eval_loaders(toy_benchmarks, tokenizer):
    ds = build_dataset("CUHK-PEDES", toy_benchmarks.root)
    img_loader, txt_loader = build_eval_loaders(_cfg(test_batch_size=3), ds, tokenizer)
    index, pids, images, bad = zip(*img_loader)
    assert all(b == [] for b in bad)
    assert torch.cat(index).tolist() == list(range(4))
    pids = torch.cat(pids)
    images = torch.cat(images)
    assert pids.tolist() == ds.test.image_pids
    assert images.shape == (4, 3, 384, 128)
    t_pids, ids = zip(*[(p, x) for _, p, x in txt_loader])
    assert torch.cat(t_pids).tolist() == ds.test.caption_pids
    ids = torch.cat(ids)
    assert ids.shape == (8, 77)
    for row, caption in zip(ids, ds.test.captions):
        assert torch.equal(row, tokenize(caption, tokenizer))
    # deterministic: a second pass gives the same images
    again = torch.cat([x for _, _, x, _ in img_loader])
    assert torch.equal(images, again)


@pytest.mark.parametrize("length, batch, world", [(16, 5, 2), (16, 20, 2), (33, 4, 3), (0, 4, 2)])
def test_sharded_eval_batches_split_one_pass_between_processes(length, batch, world):
    """Each process gets whole batches of the single-process pass (batch b to process b % world)."""
    single = list(ShardedBatchSampler(length, batch))
    assert [i for b in single for i in b] == list(range(length)) and all(len(b) <= batch for b in single)
    shares = [list(ShardedBatchSampler(length, batch, rank, world)) for rank in range(world)]
    assert [len(s) for s in shares] == [len(ShardedBatchSampler(length, batch, r, world)) for r in range(world)]
    for b, expected in enumerate(single):
        assert shares[b % world][b // world] == expected
    assert sum(len(s) for s in shares) == len(single)
