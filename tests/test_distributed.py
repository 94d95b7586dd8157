"""DDP on CPU (gloo): the global-batch losses and gradients equal one process's; torchrun training
(with an unreadable image) and evaluation (split across processes, equal to one process)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from ddp_reference import APTM_LOSS_NAMES, LOSS_NAMES, fixed_batch, fixed_patch_order, tiny_config
from model.build import build_model
from processor.processor import metric_blocks
from test_end_to_end import REPO, RUN_REPORT_KEYS, TINY
from datasets.toy import generate_toy_dataset
import train as train_entry

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# torchrun leaves a torchelastic_* folder per launch in TMPDIR: keep them in one folder removed afterwards.
TORCHRUN_TMP = tempfile.mkdtemp(prefix="torchrun-tests-")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": TORCHRUN_TMP}


@pytest.fixture(scope="module", autouse=True)
def _remove_torchrun_tmp():
    yield
    shutil.rmtree(TORCHRUN_TMP, ignore_errors=True)


@pytest.mark.parametrize("loss_names, global_losses", [
    (LOSS_NAMES, ("sdm_loss", "itc_loss", "cmpm_loss", "cmt_loss")),
    # APTM: ITC on the global batch; ITM's hard negatives drawn from the global batch with the same draws
    (APTM_LOSS_NAMES, ("aptm_itc_loss",)),
    # LGUR: the ranking terms on the gathered batch, the same draws; per-process ID terms
    ("lgur", ("lgur_rank", "lgur_rank_dict", "lgur_rank_text", "lgur_rank_image")),
    # SCMM-style: Sew on the gathered batch (margins from every process's captions)
    ("sew+id", ("sew_loss",)),
    # RDE: TAL on the gathered batch for both embeddings (BGE and TSE)
    ("tal+tse", ("tal_loss", "tse_loss")),
    # TBPS-CLIP: every loss on the gathered batch (text dropout 0: the soft pass is the first pass)
    ("nitc+mvsi+ritc+citc+ssi", ("nitc_loss", "mvsi_loss", "ritc_loss", "citc_loss", "ssi_loss")),
], ids=["irra-uit", "aptm", "lgur", "sew", "rde", "tbps-clip"])
def test_two_processes_equal_one_on_the_global_batch(tmp_path, loss_names, global_losses):
    out = tmp_path / "ddp.pt"
    proc = subprocess.run([*TORCHRUN, str(REPO / "tests/ddp_worker.py"), str(out), loss_names], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)
    torch.manual_seed(0)
    model = build_model(tiny_config(loss_names), num_classes=6)
    fixed_patch_order(model)
    outputs = model(fixed_batch())
    sum(v for k, v in outputs.items() if k.endswith("_loss")).backward()
    for name in global_losses:  # computed on the gathered global batch
        assert ddp["losses"][name].item() == pytest.approx(outputs[name].item(), abs=1e-5)
    assert set(ddp["grads"]) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        assert torch.allclose(ddp["grads"][name], param.grad, atol=1e-5, rtol=1e-4), name


def test_torchrun_trains_the_demo_config(tmp_path):
    root = tmp_path / "data"
    generate_toy_dataset(root, num_train_ids=16, num_val_ids=2, num_test_ids=8, image_size=(48, 24))
    run_dir = tmp_path / "run"
    cmd = [*TORCHRUN, "train.py", "--config_file", "configs/demo.yaml", *TINY, "--root_dir", str(root),
           "--output_dir", str(run_dir), "--num_epoch", "1", "--sampler", "identity", "--num_instance", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) == RUN_REPORT_KEYS and results["selection"]["split"] == "test"
    assert "2 process(es), global batch 16" in (run_dir / "train_log.txt").read_text()
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix in (".pth", ".json", ".yaml")) == \
        ["best.pth", "configs.yaml", "last.pth", "results.json"]
    assert len(torch.load(run_dir / "last.pth", weights_only=False)["rng"]) == 2  # one RNG state per rank


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _one_and_two_processes(script: str, run_dir: Path, out: Path, *flags: str) -> tuple[dict, dict]:
    """test_results.json of ``script`` on the run, from one process and from two (torchrun)."""
    args = ["--config_file", str(run_dir / "configs.yaml"), "--save_features", *flags]
    _run([sys.executable, script, *args, "--output_dir", str(out / "one")])
    _run([*TORCHRUN, script, *args, "--output_dir", str(out / "two")])
    one, two = (json.loads((out / n / "test_results.json").read_text()) for n in ("one", "two"))
    f1, f2 = (torch.load(out / n / "features.pt") for n in ("one", "two"))
    assert f1.keys() == f2.keys() and all(torch.equal(f1[k], f2[k]) for k in f1)
    return one, two


def test_torchrun_test_py_writes_the_numbers_of_one_process(toy_root, tmp_path):
    run_dir = tmp_path / "run"
    train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root),
                      "--output_dir", str(run_dir), "--num_epoch", "1", "--loss_names", "sdm+id"])
    # 16 images in one batch of 20 (the second process encodes none), 32 captions in two batches
    one, two = _one_and_two_processes("test.py", run_dir, tmp_path, "--test_batch_size", "20")
    assert one == two and list(metric_blocks(one)) == ["t2i", "i2t"]


def test_torchrun_evaluation_with_feature_sets_and_a_reranker_equals_one_process(toy_root, tmp_path, custom):
    run_dir = tmp_path / "run"
    train_entry.main(["--config_file", str(REPO / "configs/demo.yaml"), *TINY, "--root_dir", str(toy_root),
                      "--output_dir", str(run_dir), "--num_epoch", "1", "--loss_names", "sdm+test_mean+test_rerank",
                      "--rerank_k", "5", "--test_mean_weight", "2"])
    # batches of 5: images 4 batches (2 per process), captions 7 (4 and 3)
    one, two = _one_and_two_processes("tests/eval_worker.py", run_dir, tmp_path / "5", "--test_batch_size", "5")
    assert one == two
    assert list(metric_blocks(one)) == ["t2i", "t2i_global", "t2i_mean", "t2i_rerank", "i2t"]
    assert one["t2i_rerank"] != one["t2i"]
    # one batch of each: the second process has no query and no gallery item
    one, two = _one_and_two_processes("tests/eval_worker.py", run_dir, tmp_path / "64", "--test_batch_size", "64")
    assert one == two


def test_two_process_training_survives_a_zero_byte_jpeg(toy_root, tmp_path):
    root = tmp_path / "data"
    generate_toy_dataset(root, num_train_ids=16, num_val_ids=2, num_test_ids=8, image_size=(48, 24))
    bad = root / "CUHK-PEDES/imgs/toy/0003_01.jpg"
    bad.write_bytes(b"")
    run_dir = tmp_path / "run"
    proc = _run([*TORCHRUN, "train.py", "--config_file", "configs/demo.yaml", *TINY, "--root_dir", str(root),
                 "--output_dir", str(run_dir), "--num_epoch", "1", "--max_unreadable_train", "0.1"])
    assert f"(image {bad}) replaced by sample" in proc.stdout + proc.stderr
    assert "epoch 1: replaced 2 samples whose image could not be read" in (run_dir / "train_log.txt").read_text()
    assert set(json.loads((run_dir / "results.json").read_text())) == RUN_REPORT_KEYS
