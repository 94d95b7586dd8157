"""Short end-to-end runs on generated toy data: train, evaluate the run, zero-shot CLIP, CLI errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import test as test_entry
import train as train_entry
from datasets.toy import generate_toy_dataset
from processor.processor import metric_blocks
from utils.options import build_parser, load_yaml, resolve
from utils.visualize import restoration_size

REPO = Path(__file__).resolve().parents[1]
TINY = ["--pretrain_choice", "none", "--img_size", "48", "24", "--vision_patch_size", "12",
        "--stride_size", "12", "--vision_width", "64", "--vision_layers", "1", "--text_width", "64",
        "--text_layers", "1", "--embed_dim", "64", "--cmt_depth", "1", "--batch_size", "16",
        "--test_batch_size", "64", "--num_workers", "0", "--lr", "1e-3", "--optimizer_eps", "1e-8",
        "--warmup_epochs", "1", "--log_period", "5"]
METRICS = {"R1", "R5", "R10", "mAP", "mINP"}
# results.json of a run (beside the metric blocks): what was evaluated, how the epoch was selected
RUN_REPORT_KEYS = {"t2i", "i2t", "epoch", "checkpoint", "split", "queries", "gallery", "excluded_queries",
                   "skipped_images", "selection", "last"}


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    generate_toy_dataset(root, num_train_ids=24, num_val_ids=4, num_test_ids=12, image_size=(48, 24))
    return root


@pytest.fixture(scope="module")
def trained_run(toy_root, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("run")
    best = train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY,
                             "--root_dir", str(toy_root), "--output_dir", str(run_dir),
                             "--loss_names", "sdm+mlm+id", "--num_epoch", "2", "--eval_period", "1"])
    return run_dir, best


def test_training_writes_a_self_describing_run_directory(trained_run):
    run_dir, best = trained_run
    for name in ("configs.yaml", "train_log.txt", "best.pth", "results.json"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == RUN_REPORT_KEYS and results == best
    assert set(results["t2i"]) == METRICS and set(results["i2t"]) == METRICS
    assert all(0.0 <= v <= 100.0 for task in ("t2i", "i2t") for v in results[task].values())
    assert results["split"] == "test" and results["selection"]["split"] == "test"
    assert results["selection"]["protocol"].startswith("published")
    assert results["queries"] == {"t2i": 48, "i2t": 24} and results["excluded_queries"] == {"t2i": 0, "i2t": 0}
    assert results["last"]["epoch"] == 2 and results["skipped_images"] == []
    assert results["selection"]["value"] == results["t2i"]["R1"]
    saved = yaml.safe_load((run_dir / "configs.yaml").read_text())
    assert saved["output_dir"] == str(run_dir) and saved["num_classes"] == 24
    assert saved["clip"]["vision_width"] == 64


def test_configs_yaml_round_trips(trained_run):
    run_dir, _ = trained_run
    cfg = resolve(build_parser("t").parse_args(["--config_file", str(run_dir / "configs.yaml")]))
    assert vars(cfg) == yaml.safe_load((run_dir / "configs.yaml").read_text())
    assert load_yaml(run_dir / "configs.yaml")["loss_names"] == "sdm+mlm+id"


def test_tensorboard_logs_every_loss(trained_run):
    run_dir, _ = trained_run
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("sdm_loss", "mlm_loss", "id_loss", "lr", "img_acc", "txt_acc", "mlm_acc"):
        assert f"train/{name}" in tags
    assert "test/t2i_R1" in tags  # the selection split names the tag (val/ when selecting on val)
    losses = [e.value for e in events.Scalars("train/sdm_loss")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_uit_training_logs_its_losses_and_restores(toy_root, tmp_path):
    """UIT's heads and data options end to end: all four losses
    logged and finite, the TIR loss falls, and evaluation of the run needs none of the heads."""
    train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root),
                      "--output_dir", str(tmp_path), "--loss_names", "sdm+id+tir+cmt", "--num_epoch", "3",
                      "--eval_period", "3", "--sampler", "idrannum", "--num_instance", "2",
                      "--text_prune_prob", "0.2", "--text_mask_corruption"])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    for name in ("sdm_loss", "id_loss", "tir_loss", "cmt_loss"):
        values = [e.value for e in events.Scalars(f"train/{name}")]
        assert len(values) == 3 and all(torch.isfinite(torch.tensor(values))), name
    tir = [e.value for e in events.Scalars("train/tir_loss")]
    assert tir[2] < tir[0]
    results = test_entry.main(["--config_file", str(tmp_path / "configs.yaml"), "--output_dir", str(tmp_path / "eval"),
                               "--visualize_tir", "3"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert results["t2i"]["R1"] == pytest.approx(saved["t2i"]["R1"], abs=1e-4)
    assert json.loads((tmp_path / "eval" / "test_results.json").read_text()) == results
    with Image.open(tmp_path / "eval" / "restoration.png") as picture:
        assert picture.size == restoration_size(3, (48, 24))
        pixels = np.asarray(picture.convert("RGB"))
    row = pixels[6:6 + 48]
    left = restoration_size(3, (48, 24))[0] - 3 * (24 + 6) - 6
    original, seen, restored = (row[:, left + k * 30:left + k * 30 + 24] for k in range(3))
    assert (seen == 0).all(axis=-1).mean() > 0.5          # ~70% of the patches were dropped (black)
    gray = seen[(seen != 0).any(axis=-1)]
    assert (gray.max(axis=-1) - gray.min(axis=-1) <= 2).all()  # what the head saw is grayscale
    assert not (restored == 0).all() and not np.array_equal(restored, original)


def test_test_py_reproduces_the_best_epoch(trained_run, tmp_path):
    run_dir, best = trained_run
    results = test_entry.main(["--config_file", str(run_dir / "configs.yaml"), "--output_dir", str(tmp_path)])
    for task in ("t2i", "i2t"):
        for key in METRICS:
            assert results[task][key] == pytest.approx(best[task][key], abs=0.01)
    assert json.loads((tmp_path / "test_results.json").read_text()) == results
    assert results["epoch"] == best["epoch"] and results["checkpoint"] == str(run_dir / "best.pth")
    before = (run_dir / "results.json").read_bytes()
    test_entry.main(["--config_file", str(run_dir / "configs.yaml")])  # into the run directory itself
    assert (run_dir / "results.json").read_bytes() == before  # training's results are never overwritten
    assert json.loads((run_dir / "test_results.json").read_text())["t2i"] == results["t2i"]


@pytest.mark.parametrize("fmt", ["state_dict", "jit"])
def test_zero_shot_evaluates_a_pretrained_checkpoint(toy_root, openai_checkpoint, tmp_path, fmt):
    ckpt, _ = openai_checkpoint(fmt=fmt)
    out = tmp_path / "zs"
    results = test_entry.main(["--zero_shot", "--dataset_name", "CUHK-PEDES", "--root_dir", str(toy_root),
                               "--pretrain_choice", str(ckpt), "--output_dir", str(out),
                               "--img_size", "48", "24", "--num_workers", "0", "--test_batch_size", "64"])
    assert json.loads((out / "test_results.json").read_text()) == results
    assert (out / "configs.yaml").is_file()


def test_zero_shot_formats_agree(toy_root, openai_checkpoint, tmp_path):
    args = ["--zero_shot", "--dataset_name", "CUHK-PEDES", "--root_dir", str(toy_root),
            "--img_size", "48", "24", "--num_workers", "0"]
    sd, _ = openai_checkpoint(fmt="state_dict")
    jit, _ = openai_checkpoint(fmt="jit")
    a = test_entry.main([*args, "--pretrain_choice", str(sd), "--output_dir", str(tmp_path / "a")])
    b = test_entry.main([*args, "--pretrain_choice", str(jit), "--output_dir", str(tmp_path / "b")])
    assert metric_blocks(a) == metric_blocks(b) and a["checkpoint"] == str(sd) and b["checkpoint"] == str(jit)


@pytest.mark.parametrize("flags, message", [  # every case in-process: test_reliability.py
    (["--loss_names", "sdm+foo"], "unknown loss name 'foo'"),
])
def test_user_mistakes_give_one_clear_line(toy_root, tmp_path, flags, message):
    args = [sys.executable, "train.py", "--config_file", "configs/demo.yaml", "--root_dir", str(toy_root),
            "--output_dir", str(tmp_path / "run"), "--num_workers", "0", *flags]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


def test_unknown_config_key_suggests_the_closest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batchsize: 8\n")
    proc = subprocess.run([sys.executable, "train.py", "--config_file", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "unknown config key 'batchsize'" in proc.stderr and "batch_size" in proc.stderr
