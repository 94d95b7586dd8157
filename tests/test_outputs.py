"""Evaluation outputs: features export, the retrieval picture, the results table tool, and the
training loop evaluating through the retrieval engine."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

import test as test_entry
import train as train_entry
import processor.evaluation
import utils.metrics
from datasets.toy import generate_toy_dataset
from test_end_to_end import REPO, TINY
from tools.collect_results import main as collect_main
from utils.errors import run_cli
from utils.visualize import grid_size


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    generate_toy_dataset(root, num_train_ids=12, num_val_ids=2, num_test_ids=8, image_size=(48, 24))
    run_dir = tmp_path_factory.mktemp("run")
    train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(root),
                      "--output_dir", str(run_dir), "--loss_names", "sdm+id", "--num_epoch", "1"])
    return run_dir


def test_save_features_and_visualize(run, tmp_path):
    out = tmp_path / "eval"
    results = test_entry.main(["--config_file", str(run / "configs.yaml"), "--output_dir", str(out),
                               "--save_features", "--visualize", "3"])
    feats = torch.load(out / "features.pt")
    assert feats["text_feats"].shape == (32, 64) and feats["image_feats"].shape == (16, 64)
    assert feats["text_pids"].shape == (32,) and feats["image_pids"].shape == (16,)
    assert torch.allclose(feats["text_feats"].norm(dim=1), torch.ones(32), atol=1e-5)
    again = utils.metrics.retrieval_metrics(feats["text_feats"], feats["image_feats"],
                                            feats["text_pids"], feats["image_pids"])
    assert again == pytest.approx(results["t2i"])
    with Image.open(out / "retrieval.png") as picture:
        assert picture.size == grid_size(3, 10)
        # the first thumbnail's frame is green or red
        frame = picture.getpixel((grid_size(3, 10)[0] - 10 * (64 + 14) - 6 + 1, 7))
        assert frame in ((40, 170, 60), (210, 40, 40))


def test_collect_results_prints_a_markdown_table(run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"t2i": {"R1": 73.38, "R5": 89.93, "R10": 93.71,
                                                            "mAP": 66.13, "mINP": 50.24}}))
    (other / "configs.yaml").write_text(yaml.safe_dump({"name": "irra", "dataset_name": "CUHK-PEDES"}))
    assert collect_main([str(run), str(other)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| method | dataset | n | R1 | R5 | R10 | mAP | mINP |"
    assert lines[3] == "| irra | CUHK-PEDES | 1 | 73.38 | 89.93 | 93.71 | 66.13 | 50.24 |"
    best = json.loads((run / "results.json").read_text())["t2i"]
    assert lines[2].startswith("| demo | CUHK-PEDES | 1 | " + f"{best['R1']:.2f} |")
    assert collect_main([str(tmp_path / "missing")]) == 1


def test_training_evaluates_with_the_retrieval_engine(run, tmp_path, monkeypatch):
    calls = []
    engine = processor.evaluation.first_stage

    def spy(q, g, qp, gp, **kwargs):
        calls.append((len(q), len(g)))
        return engine(q, g, qp, gp, **kwargs)

    monkeypatch.setattr(processor.evaluation, "first_stage", spy)
    cfg = yaml.safe_load((run / "configs.yaml").read_text())
    train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", cfg["root_dir"],
                      "--output_dir", str(tmp_path / "r"), "--loss_names", "sdm", "--num_epoch", "2",
                      "--eval_period", "1"])
    assert calls == [(32, 16), (16, 32)] * 2  # t2i then i2t, each epoch


def test_visualize_tir_needs_the_tir_head(run, tmp_path, capsys):
    args = ["--config_file", str(run / "configs.yaml"), "--output_dir", str(tmp_path), "--visualize_tir", "2"]
    assert run_cli(test_entry.main, args) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: --visualize_tir needs a run trained with the tir head (its loss_names has no 'tir')"
