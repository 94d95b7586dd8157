"""DDP on CPU (gloo): the global-batch losses and gradients equal one process's; torchrun training."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ddp_reference import fixed_batch, fixed_patch_order, tiny_config
from model.build import build_model
from test_end_to_end import REPO, TINY
from datasets.toy import generate_toy_dataset

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_two_processes_equal_one_on_the_global_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    proc = subprocess.run([*TORCHRUN, str(REPO / "tests/ddp_worker.py"), str(out)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)
    torch.manual_seed(0)
    model = build_model(tiny_config(), num_classes=6)
    fixed_patch_order(model)
    outputs = model(fixed_batch())
    sum(v for k, v in outputs.items() if k.endswith("_loss")).backward()
    for name in ("sdm_loss", "itc_loss", "cmpm_loss", "cmt_loss"):  # computed on the gathered global batch
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
    assert set(results) == {"t2i", "i2t", "epoch"}
    assert "2 process(es), global batch 16" in (run_dir / "train_log.txt").read_text()
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix in (".pth", ".json", ".yaml")) == \
        ["best.pth", "configs.yaml", "last.pth", "results.json"]
    assert len(torch.load(run_dir / "last.pth", weights_only=False)["rng"]) == 2  # one RNG state per rank
