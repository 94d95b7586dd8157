"""SDPA attention equals the plain formula; autocast (bf16/fp16) trains; gradient checkpointing and
accumulation leave the gradients unchanged."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from ddp_reference import fixed_batch, fixed_patch_order, tiny_config
from model.blocks import MultiheadAttention, Transformer
from model.build import build_model
from processor.processor import EpochTrainer


def plain_attention(attn: MultiheadAttention, q, k, v, causal: bool) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V per head, written out."""
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    heads = attn.heads

    def split(x):
        b, n, d = x.shape
        return x.view(b, n, heads, d // heads).transpose(1, 2)

    qh, kh, vh = split(q @ w_q.t() + b_q), split(k @ w_k.t() + b_k), split(v @ w_v.t() + b_v)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
    if causal:
        scores = scores + torch.full(scores.shape[-2:], float("-inf")).triu(1)
    out = (scores.softmax(-1) @ vh).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
    return attn.out_proj(out)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_attention_equals_the_plain_formula(causal):
    torch.manual_seed(0)
    attn = MultiheadAttention(64, 4)
    nn.init.normal_(attn.in_proj_bias, std=0.1)
    x = torch.randn(3, 11, 64)
    assert torch.allclose(attn(x, x, x, causal=causal), plain_attention(attn, x, x, x, causal), atol=1e-5)


@pytest.mark.parametrize("kv_width", [64, 48])
def test_attention_equals_torch_multihead_attention_with_the_same_weights(kv_width):
    torch.manual_seed(0)
    ours = MultiheadAttention(64, 4, kv_width=kv_width)
    ref = nn.MultiheadAttention(64, 4, batch_first=True, kdim=kv_width, vdim=kv_width)
    ref.load_state_dict(ours.state_dict())  # the same parameter names and layout
    q, kv = torch.randn(2, 7, 64), torch.randn(2, 13, kv_width)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 9:] = False
    expected = ref(q, kv, kv, need_weights=False, key_padding_mask=~mask)[0]
    assert torch.allclose(ours(q, kv, kv, key_mask=mask), expected, atol=1e-5)


class _Loader(list):
    """Batches as the training loader yields them (with the ``replaced`` count)."""
    sampler = None

    def __init__(self, batches):
        super().__init__({**batch, "replaced": torch.zeros(len(batch["pids"]))} for batch in batches)


def _train_one_epoch(amp: str, accum_steps: int = 1, batches=None, wrap=None):
    torch.manual_seed(0)
    model = build_model(tiny_config(), num_classes=6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = EpochTrainer(wrap(model) if wrap else model, optimizer, torch.device("cpu"), 100, 10, amp, accum_steps)
    stats = trainer.run(_Loader(batches or [fixed_batch(), fixed_batch()]), epoch=1)
    return model, before, stats, trainer.step


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_training_step_on_cpu(amp):
    # fp16's GradScaler starts at 2^16 and skips the overflowing first steps while it calibrates
    model, before, stats, trainer = _train_one_epoch(amp, batches=[fixed_batch()] * 20)
    assert all(math.isfinite(v) for v in stats.values()) and stats["nonfinite_steps"] == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    if amp == "fp16":
        assert trainer.scaler.get_scale() < 2.0 ** 16


def test_autocast_runs_the_matmuls_in_low_precision():
    torch.manual_seed(0)
    model = build_model(tiny_config(), num_classes=6)
    batch = fixed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.encoder.encode_image(batch["images"])
    assert tokens.dtype == torch.bfloat16
    assert model.encode_image(batch["images"]).dtype == torch.float32


def _grads(model, batch):
    model.zero_grad()
    outputs = model(batch)
    sum(v for k, v in outputs.items() if k.endswith("_loss")).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = build_model(tiny_config(), num_classes=6)
    fixed_patch_order(model)  # the same TIR mask in both passes
    batch = fixed_batch()
    plain = _grads(model, batch)
    model.encoder.set_grad_checkpointing(True)
    checkpointed = _grads(model, batch)
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_accumulation_equals_the_larger_batch_for_per_sample_losses():
    cfg = tiny_config()
    cfg.loss_names = "id"
    batch = fixed_batch()
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=6)
    whole = _grads(model, batch)
    model.zero_grad()
    for half in range(2):  # two micro-batches of 4, each loss divided by 2 (accum_steps)
        part = {k: v.chunk(2)[half] for k, v in batch.items()}
        outputs = model(part)
        (outputs["id_loss"] / 2).backward()
    assert all(torch.allclose(whole[n], p.grad, atol=1e-6) for n, p in model.named_parameters() if n in whole)


def test_accum_steps_steps_the_optimizer_every_n_batches():
    *_, trainer = _train_one_epoch("off", accum_steps=2, batches=[fixed_batch()] * 4)
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() == 2
    *_, trainer = _train_one_epoch("off", accum_steps=3, batches=[fixed_batch()] * 4)
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() == 2  # 3 + the last partial one


class _NoSyncSpy(torch.nn.Module):
    """Stands in for the DDP wrapper: records, per forward, whether gradient sync was suspended."""

    def __init__(self, module):
        super().__init__()
        self.module, self.suspended, self.log = module, False, []

    @contextlib.contextmanager
    def no_sync(self):
        self.suspended = True
        yield
        self.suspended = False

    def forward(self, batch):
        self.log.append(self.suspended)
        return self.module(batch)


def test_accumulation_syncs_gradients_only_on_the_micro_batch_that_steps():
    spy = {}

    def wrap(model):
        spy["module"] = _NoSyncSpy(model)
        return spy["module"]

    _train_one_epoch("off", accum_steps=3, batches=[fixed_batch()] * 5, wrap=wrap)
    # steps after batches 3 and 5 (the last, partial group): only those all-reduce
    assert spy["module"].log == [True, True, False, True, False]


def test_compiled_towers_give_the_same_loss_and_keys():
    torch.manual_seed(0)
    model = build_model(tiny_config(), num_classes=6)
    batch = fixed_batch()
    keys, eager = list(model.state_dict()), model(batch)["sdm_loss"]
    model.encoder.compile_towers()
    compiled = model(batch)["sdm_loss"]
    assert compiled.item() == pytest.approx(eager.item(), abs=1e-4)
    assert list(model.state_dict()) == keys  # checkpoints stay interchangeable


@pytest.mark.parametrize("causal", [False, True])
def test_attention_row_equals_torch_need_weights(causal):
    """RDE's token selection reads the last block's head-averaged attention (CLIP's
    ``nn.MultiheadAttention`` with need_weights); ours computes one query row of it."""
    torch.manual_seed(0)
    transformer = Transformer(64, 3, 4)
    for block in transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_bias, std=0.1)
    x, rows = torch.randn(3, 11, 64), torch.tensor([0, 6, 10])
    out, attention = transformer.forward_with_attention(x, rows, causal)
    assert torch.equal(out, transformer(x, causal))
    last = transformer.resblocks[-1]
    ref = nn.MultiheadAttention(64, 4, batch_first=True)
    ref.load_state_dict(last.attn.state_dict())
    h = last.ln_1(transformer(x, causal, blocks=2))
    mask = torch.ones(11, 11, dtype=torch.bool).triu(1) if causal else None
    weights = ref(h, h, h, need_weights=True, average_attn_weights=True, attn_mask=mask)[1]
    torch.testing.assert_close(attention, weights[torch.arange(3), rows], atol=1e-6, rtol=1e-5)
    assert torch.allclose(attention.sum(dim=1), torch.ones(3))
    if causal:
        assert attention[0, 1:].eq(0).all() and attention[1, 7:].eq(0).all()
