"""Dataset layouts beyond the three raw benchmark files (UFine6926, TBPS-CLIP's ``*_reid.json`` with
``captions_bt``), the toy generator in every layout, a val split carved from training identities,
and tools/check_dataset.py on generated files with planted problems."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from datasets import build_dataset
from datasets.bases import DATASETS, DatasetError, choose_val_ids
from datasets.toy import generate_toy_dataset
from tools.check_dataset import main as check_main

SMALL = dict(num_train_ids=6, num_val_ids=2, num_test_ids=3, image_size=(32, 16))


@pytest.mark.parametrize("name", ["CUHK-PEDES", "ICFG-PEDES", "RSTPReid", "UFine6926"])
def test_the_toy_generator_writes_every_published_layout(tmp_path, name):
    val = 0 if name == "ICFG-PEDES" else 2
    folder = generate_toy_dataset(tmp_path, **{**SMALL, "num_val_ids": val}, dataset_name=name)
    layout = DATASETS[name]
    records = json.loads((folder / layout.annotation_files[0]).read_text())
    assert all(layout.path_field in r for r in records)
    dataset = build_dataset(name, tmp_path)
    assert dataset.num_classes == 6 and len(dataset.train) == 6 * 2 * 2
    assert len(dataset.val.img_paths) == val * 2 and len(dataset.test.img_paths) == 3 * 2
    assert all(Path(p).is_file() for p in dataset.test.img_paths)
    assert sorted({pid for pid, *_ in dataset.train}) == list(range(6))


def test_ufine6926_paths_are_relative_to_the_dataset_folder(tmp_path):
    folder = generate_toy_dataset(tmp_path, **SMALL, dataset_name="UFine6926")
    record = json.loads((folder / "ufine6926.json").read_text())[0]
    assert record["id"] == 1 and set(record) == {"split", "captions", "file_path", "id"}
    dataset = build_dataset("UFine6926", tmp_path)
    assert dataset.train[0][2] == str(folder / record["file_path"])


def _tbps_files(tmp_path: Path) -> tuple[Path, list[dict]]:
    """The toy CUHK-PEDES rewritten as TBPS-CLIP's files: no split field, training ids out of order,
    back-translations on some records (one missing, one shorter list)."""
    folder = generate_toy_dataset(tmp_path, **SMALL)
    records = json.loads((folder / "reid_raw.json").read_text())
    train = [{k: v for k, v in r.items() if k in ("file_path", "id", "captions")} for r in records if r["split"] == "train"]
    train = train[4:] + train[:4]  # ids 3, 3, 4, 4, 5, ... then 1, 1, 2, 2: first appearance != sorted
    for i, record in enumerate(train):
        record["id"] += 100
        if i == 1:
            continue  # no captions_bt
        record["captions_bt"] = [f"translated {i} {j}" for j in range(len(record["captions"]) - (i == 2))]
    test = [{k: v for k, v in r.items() if k in ("file_path", "id", "captions")} for r in records if r["split"] == "test"]
    (folder / "train_reid.json").write_text(json.dumps(train))
    (folder / "test_reid.json").write_text(json.dumps(test))
    return folder, train


def test_tbps_reid_files_with_back_translations(tmp_path, caplog):
    folder, train = _tbps_files(tmp_path)
    dataset = build_dataset("CUHK-PEDES", tmp_path, "tbps")
    first_seen = list(dict.fromkeys(r["id"] for r in train))
    assert [pid for pid, *_ in dataset.train] == [first_seen.index(r["id"]) for r in train for _ in r["captions"]]
    assert [r[3] for r in dataset.train] == [c for r in train for c in r["captions"]]
    expected_bt = []
    for i, record in enumerate(train):
        bt = record.get("captions_bt", [])
        expected_bt += [bt[j] if j < len(bt) else "" for j in range(len(record["captions"]))]
    assert dataset.back_translations == expected_bt
    assert expected_bt[2:4] == ["", ""] and expected_bt[5] == ""  # missing field; the short list's tail
    assert "1 training records of CUHK-PEDES have a captions_bt list whose length differs" in caplog.text
    assert not dataset.val.img_paths and len(dataset.test.img_paths) == 6
    assert dataset.test.image_pids[0] == json.loads((folder / "test_reid.json").read_text())[0]["id"]  # raw


def test_tbps_format_names_a_missing_file_and_bad_translations(tmp_path):
    folder, train = _tbps_files(tmp_path)
    train[0]["captions_bt"] = "not a list"
    (folder / "train_reid.json").write_text(json.dumps(train))
    with pytest.raises(DatasetError, match="captions_bt is 'not a list', not a list of strings"):
        build_dataset("CUHK-PEDES", tmp_path, "tbps")
    (folder / "test_reid.json").unlink()
    with pytest.raises(DatasetError, match="annotation file not found: .*test_reid.json"):
        build_dataset("CUHK-PEDES", tmp_path, "tbps")


def test_raw_annotations_may_carry_back_translations(tmp_path):
    folder = generate_toy_dataset(tmp_path, **SMALL)
    records = json.loads((folder / "reid_raw.json").read_text())
    records[0]["captions_bt"] = ["b0", "b1"]
    (folder / "reid_raw.json").write_text(json.dumps(records))
    dataset = build_dataset("CUHK-PEDES", tmp_path)
    assert dataset.back_translations[:2] == ["b0", "b1"] and set(dataset.back_translations[2:]) == {""}


def test_carving_val_identities_from_training(tmp_path):
    generate_toy_dataset(tmp_path, **{**SMALL, "num_val_ids": 0}, dataset_name="ICFG-PEDES")
    dataset = build_dataset("ICFG-PEDES", tmp_path)
    ids = choose_val_ids(dataset, 2, seed=0)
    assert ids == choose_val_ids(build_dataset("ICFG-PEDES", tmp_path), 2, seed=0)  # seeded
    assert len(ids) == 2 and set(ids) <= set(dataset.train_ids())
    train_paths = {path for _, _, path, _ in dataset.train}
    dataset.carve_val(ids)
    assert dataset.val_from_train == ids and sorted(set(dataset.val.image_pids)) == ids
    assert dataset.num_classes == 4 and sorted({pid for pid, *_ in dataset.train}) == list(range(4))
    assert set(dataset.val.img_paths) <= train_paths
    assert not set(dataset.val.img_paths) & {path for _, _, path, _ in dataset.train}  # disjoint
    assert len(dataset.val.captions) == 2 * 2 * 2 and len(dataset.train) == 4 * 2 * 2
    with pytest.raises(DatasetError, match="must be fewer than the 6 training ids"):
        choose_val_ids(build_dataset("ICFG-PEDES", tmp_path), 6, seed=0)
    with pytest.raises(DatasetError, match="has its own val split"):
        generate_toy_dataset(tmp_path / "cuhk", **SMALL)
        build_dataset("CUHK-PEDES", tmp_path / "cuhk").carve_val([1])


# ---------------------------------------------------------------- tools/check_dataset.py
def test_check_dataset_names_a_missing_image_and_an_empty_caption(tmp_path, capsys):
    folder = generate_toy_dataset(tmp_path, **SMALL)
    records = json.loads((folder / "reid_raw.json").read_text())
    missing = folder / "imgs" / records[3]["file_path"]
    missing.unlink()
    records[5]["captions"][1] = ""
    (folder / "reid_raw.json").write_text(json.dumps(records))
    assert check_main(["--dataset_name", "CUHK-PEDES", "--root_dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"error: missing image {missing}" in out
    assert f"error: entry 5 ({records[5]['file_path']}): caption 1 is ''" in out
    assert "CUHK-PEDES at" in out and "2 error(s)" in out
    assert "| train |  6  |   12   |    24    |" in out  # the split table still printed


def test_check_dataset_warnings_and_a_clean_dataset(tmp_path, capsys):
    folder = generate_toy_dataset(tmp_path, **SMALL, dataset_name="RSTPReid")
    assert check_main(["--dataset_name", "RSTPReid", "--root_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0 error(s)" in out and "differ from the published (3701, 18505, 37010)" in out
    records = json.loads((folder / "data_captions.json").read_text())
    test_record = next(r for r in records if r["split"] == "test")
    records.append({**test_record, "split": "train"})  # a test identity (and image) in training too
    records[0]["captions"][1] = records[0]["captions"][0]
    (folder / "data_captions.json").write_text(json.dumps(records))
    (folder / "imgs" / records[1]["img_path"]).write_bytes(b"not a jpeg")
    assert check_main(["--dataset_name", "RSTPReid", "--root_dir", str(tmp_path), "--text_length", "8"]) == 1
    out = capsys.readouterr().out
    assert f"error: unreadable image {folder / 'imgs' / records[1]['img_path']}" in out
    assert "1 identities are in both train and test" in out
    assert f"image {folder / 'imgs' / test_record['img_path']} has more than one record" in out
    assert "given twice" in out and "longer than 8 tokens" in out


def test_check_dataset_names_an_image_path_that_is_a_folder(tmp_path, capsys):
    folder = generate_toy_dataset(tmp_path, **SMALL)
    record = json.loads((folder / "reid_raw.json").read_text())[2]
    image = folder / "imgs" / record["file_path"]
    image.unlink()
    image.mkdir()
    assert check_main(["--dataset_name", "CUHK-PEDES", "--root_dir", str(tmp_path)]) == 1
    assert f"error: image path is not a file: {image}\n" in capsys.readouterr().out


def test_check_dataset_names_training_ids_that_cannot_be_classes(tmp_path, capsys):
    folder = generate_toy_dataset(tmp_path, **SMALL)
    records = json.loads((folder / "reid_raw.json").read_text())
    for record in records:
        if record["split"] == "train" and record["id"] == 2:
            record["id"] = 40
    (folder / "reid_raw.json").write_text(json.dumps(records))
    problem = "train ids must run from 1 without gaps (one ID-loss class each): 6 distinct ids from 1 to 40, id 2 is absent"
    assert check_main(["--dataset_name", "CUHK-PEDES", "--root_dir", str(tmp_path)]) == 1
    assert f"error: {problem}" in capsys.readouterr().out
    with pytest.raises(DatasetError, match=f"^CUHK-PEDES {re.escape(problem)}$"):  # what training says
        build_dataset("CUHK-PEDES", tmp_path)


def test_check_dataset_on_a_missing_folder(tmp_path, capsys):
    assert check_main(["--dataset_name", "ICFG-PEDES", "--root_dir", str(tmp_path)]) == 1
    assert f"error: ICFG-PEDES not found: no folder {tmp_path / 'ICFG-PEDES'}" in capsys.readouterr().out


def test_the_generator_refuses_a_val_split_for_icfg(tmp_path):
    with pytest.raises(ValueError, match="ICFG-PEDES has no val split"):
        generate_toy_dataset(tmp_path, **SMALL, dataset_name="ICFG-PEDES")
