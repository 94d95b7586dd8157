"""Tests for the synthetic CUHK-PEDES-format toy dataset."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.toy import ATTRIBUTES, Identity, generate_toy_dataset, sample_identities

SMALL = dict(num_train_ids=6, num_val_ids=2, num_test_ids=4, images_per_id=2, captions_per_image=2)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_toy_dataset(tmp_path_factory.mktemp("toy"), **SMALL)


def _annos(out: Path) -> list[dict]:
    return json.loads((out / "reid_raw.json").read_text())


def _pixels(out: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(out / "imgs" / a["file_path"])) for a in _annos(out)]


def test_layout_and_schema(toy: Path) -> None:
    assert toy.name == "CUHK-PEDES" and (toy / "toy_meta.json").is_file()
    annos = _annos(toy)
    assert len(annos) == 12 * 2
    for a in annos:
        assert set(a) == {"split", "captions", "file_path", "id", "processed_tokens"}
        assert a["split"] in {"train", "val", "test"}
        assert len(a["captions"]) == 2 and a["captions"][0] != a["captions"][1]
        assert a["processed_tokens"] == [c.replace(",", "").replace(".", "").split() for c in a["captions"]]
        assert all(c == c.lower() for c in a["captions"])


def test_ids_contiguous_per_split(toy: Path) -> None:
    annos = _annos(toy)
    assert [a["split"] for a in annos] == ["train"] * 12 + ["val"] * 4 + ["test"] * 8
    ids = [a["id"] for a in annos]
    assert ids == sorted(ids)  # records of one identity are contiguous
    expected = {"train": range(1, 7), "val": range(7, 9), "test": range(9, 13)}
    for split, rng in expected.items():
        assert sorted({a["id"] for a in annos if a["split"] == split}) == list(rng)


def test_images_open_with_size(toy: Path) -> None:
    for a in _annos(toy):
        with Image.open(toy / "imgs" / a["file_path"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (48, 96)
    paths = [a["file_path"] for a in _annos(toy)]
    assert len(set(paths)) == len(paths)


def test_image_size_parameter(tmp_path: Path) -> None:
    out = generate_toy_dataset(tmp_path, num_train_ids=1, num_val_ids=0, num_test_ids=1, image_size=(64, 32))
    assert Image.open(out / "imgs" / _annos(out)[0]["file_path"]).size == (32, 64)


def test_deterministic(tmp_path: Path, toy: Path) -> None:
    same = generate_toy_dataset(tmp_path / "a", **SMALL)
    assert (same / "reid_raw.json").read_bytes() == (toy / "reid_raw.json").read_bytes()
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(same), _pixels(toy), strict=True))
    other = generate_toy_dataset(tmp_path / "b", **SMALL, seed=1)
    assert (other / "reid_raw.json").read_bytes() != (toy / "reid_raw.json").read_bytes()
    assert not np.array_equal(_pixels(other)[0], _pixels(toy)[0])


def test_identities_unique_and_in_vocab() -> None:
    people = sample_identities(350, np.random.default_rng(0))
    assert len(set(people)) == 350
    for p in people:
        assert p.upper_color in ATTRIBUTES["upper_color"] and p.lower_type in ATTRIBUTES["lower_type"]
        assert (p.bag == "none") == (p.bag_color == "none")
    assert {p.upper_color for p in people} == set(ATTRIBUTES["upper_color"])


def test_captions_mention_attributes(tmp_path: Path) -> None:
    out = generate_toy_dataset(tmp_path, num_train_ids=40, num_val_ids=0, num_test_ids=0)
    people = sample_identities(40, np.random.default_rng(0))  # same first draw as the generator
    by_id = {i: p for i, p in enumerate(people, start=1)}
    for a in _annos(out):
        p: Identity = by_id[a["id"]]
        for tokens in a["processed_tokens"]:
            text = " ".join(tokens)
            assert p.gender in tokens and p.upper_type in tokens
            assert f"{p.upper_color} {p.upper_type}" in text
            lower_words = {"trousers": ("trousers", "pants")}.get(p.lower_type, (p.lower_type,))
            assert any(f"{p.lower_color} {w}" in text for w in lower_words)
            if p.hat != "none":
                assert f"{p.hat} hat" in text or f"{p.hat} cap" in text
            if p.bag != "none":
                assert f"{p.bag_color} {p.bag}" in text


def test_rerun_is_noop_and_param_change_regenerates(tmp_path: Path) -> None:
    out = generate_toy_dataset(tmp_path, **SMALL)
    img = out / "imgs" / _annos(out)[0]["file_path"]
    stamps = ((out / "reid_raw.json").stat().st_mtime_ns, img.stat().st_mtime_ns)
    assert generate_toy_dataset(tmp_path, **SMALL) == out
    assert ((out / "reid_raw.json").stat().st_mtime_ns, img.stat().st_mtime_ns) == stamps
    generate_toy_dataset(tmp_path, **{**SMALL, "num_test_ids": 1})
    assert len({a["id"] for a in _annos(out)}) == 9
    assert len(list((out / "imgs" / "toy").iterdir())) == 18  # stale images removed


def test_cli(tmp_path: Path) -> None:
    cmd = [sys.executable, "tools/generate_toy_data.py", "--root_dir", str(tmp_path), "--num_train_ids", "3",
           "--num_val_ids", "1", "--num_test_ids", "2"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert "test : 2 ids, 4 images, 8 captions" in res.stdout
    assert (tmp_path / "CUHK-PEDES" / "reid_raw.json").is_file()
