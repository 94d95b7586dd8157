"""Optimizer parameter groups and the lr schedule. Our groups follow module roles; the tests check that
every parameter still gets the lr and weight decay of IRRA (anosorae/IRRA @ cfc2378) solver/build.py,
and the warm-up cosine factors of its solver/lr_scheduler.py."""
import math

import pytest
import torch

from model.build import build_model
from solver.build import build_lr_scheduler, build_optimizer
from conftest import tiny_model_config

pytestmark = pytest.mark.usefixtures("single_thread")


def make_cfg(**overrides):
    return tiny_model_config(**overrides)


@pytest.fixture(scope="module")
def model_and_optimizer():
    torch.manual_seed(0)
    cfg = make_cfg(loss_names="id+mlm", lr=1e-5, lr_factor=5.0, bias_lr_factor=2.0,
                   weight_decay=4e-5, weight_decay_bias=0.0, optimizer="Adam")
    model = build_model(cfg, num_classes=7)
    return cfg, model, build_optimizer(cfg, model)


def group_of(optimizer, param):
    found = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    assert len(found) == 1
    return found[0]


def lr_wd(optimizer, model, name):
    g = group_of(optimizer, dict(model.named_parameters())[name])
    return g["lr"], g["weight_decay"]


@pytest.mark.parametrize("name, lr, wd", [
    ("encoder.visual.conv1.weight", 1e-5, 4e-5),
    ("encoder.token_embedding.weight", 1e-5, 4e-5),
    ("encoder.visual.class_embedding", 1e-5, 4e-5),
    ("encoder.positional_embedding", 1e-5, 4e-5),
    ("encoder.ln_final.weight", 1e-5, 4e-5),
    ("encoder.transformer.resblocks.0.attn.in_proj_weight", 1e-5, 4e-5),
    ("encoder.ln_final.bias", 2e-5, 0.0),
    ("encoder.transformer.resblocks.0.attn.in_proj_bias", 2e-5, 0.0),
    ("encoder.visual.transformer.resblocks.0.mlp.c_fc.bias", 2e-5, 0.0),
    ("heads.mlm.cross_attn.in_proj_bias", 2e-5, 0.0),
    ("heads.mlm.cross_attn.out_proj.bias", 2e-5, 0.0),
    ("heads.mlm.cross_modal_transformer.resblocks.0.mlp.c_fc.bias", 2e-5, 0.0),
    ("heads.mlm.cross_modal_transformer.resblocks.0.ln_1.bias", 2e-5, 0.0),
    ("heads.mlm.cross_attn.in_proj_weight", 5e-5, 4e-5),
    ("heads.mlm.cross_attn.out_proj.weight", 5e-5, 4e-5),
    ("heads.mlm.cross_modal_transformer.resblocks.0.mlp.c_proj.weight", 5e-5, 4e-5),
    ("heads.mlm.cross_modal_transformer.resblocks.0.ln_2.weight", 5e-5, 4e-5),
    ("heads.mlm.mlm_head.fc.bias", 5e-5, 0.0),
    ("heads.mlm.mlm_head.dense.bias", 5e-5, 0.0),
    ("heads.mlm.mlm_head.ln.bias", 5e-5, 0.0),
    ("heads.mlm.mlm_head.fc.weight", 5e-5, 4e-5),
    ("heads.mlm.mlm_head.ln.weight", 5e-5, 4e-5),
    ("heads.id.classifier.weight", 5e-5, 4e-5),
    ("heads.id.classifier.bias", 5e-5, 0.0),
    ("heads.mlm.ln_pre_t.weight", 1e-5, 4e-5),
    ("heads.mlm.ln_pre_t.bias", 2e-5, 0.0),
    ("heads.mlm.ln_pre_i.weight", 1e-5, 4e-5),
    ("heads.mlm.ln_post.bias", 2e-5, 0.0),
])
def test_group_lr_and_weight_decay_by_role(model_and_optimizer, name, lr, wd):
    cfg, model, opt = model_and_optimizer
    got_lr, got_wd = lr_wd(opt, model, name)
    assert got_lr == pytest.approx(lr, rel=1e-12)
    assert got_wd == pytest.approx(wd, rel=1e-12, abs=0)


def irra_name(name):
    """Our parameter name -> IRRA's (CLIP under ``base_model.``, the head modules at the top level)."""
    if name.startswith("encoder."):
        return "base_model." + name[len("encoder."):]
    if name.startswith("heads.id."):
        return name[len("heads.id."):]
    if name.startswith("heads.mlm."):
        return name[len("heads.mlm."):]
    raise AssertionError(name)


def irra_lr_wd(cfg, key):
    """IRRA's solver/build.py substring rules, in order (later rules override earlier ones)."""
    lr, wd = cfg.lr, cfg.weight_decay
    if "cross" in key:
        lr = cfg.lr * cfg.lr_factor
    if "bias" in key:
        lr = cfg.lr * cfg.bias_lr_factor
        wd = cfg.weight_decay_bias
    if "classifier" in key or "mlm_head" in key:
        lr = cfg.lr * cfg.lr_factor
    return lr, wd


def test_every_parameter_matches_irra_rules(model_and_optimizer):
    cfg, model, opt = model_and_optimizer
    for name, param in model.named_parameters():
        expected = irra_lr_wd(cfg, irra_name(name))
        g = group_of(opt, param)
        assert (g["lr"], g["weight_decay"]) == pytest.approx(expected, rel=1e-12), name


def test_every_parameter_in_exactly_one_group(model_and_optimizer):
    cfg, model, opt = model_and_optimizer
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert len(ids) == len(list(model.parameters()))


def test_adam_hyperparameters(model_and_optimizer):
    cfg, model, opt = model_and_optimizer
    assert type(opt) is torch.optim.Adam  # coupled L2, not AdamW
    for g in opt.param_groups:
        assert g["betas"] == (0.9, 0.999)
        assert g["eps"] == 1e-3


def test_other_optimizers():
    torch.manual_seed(0)
    cfg = make_cfg(loss_names="id", optimizer="AdamW")
    model = build_model(cfg, num_classes=3)
    assert type(build_optimizer(cfg, model)) is torch.optim.AdamW
    cfg = make_cfg(loss_names="id", optimizer="SGD", momentum=0.9)
    opt = build_optimizer(cfg, model)
    assert type(opt) is torch.optim.SGD
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    # the groups still carry per-role weight decay
    assert group_of(opt, model.heads.id.classifier.bias)["weight_decay"] == 0.0
    assert group_of(opt, model.heads.id.classifier.weight)["weight_decay"] == pytest.approx(4e-5)


# ---------------------------------------------------------------- schedule
def factors_per_epoch(cfg, num_groups_lrs=(1e-5, 5e-5)):
    """lr during epoch e (1-based) / base lr: the scheduler has been stepped e-1 times."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in num_groups_lrs]
    opt = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(params, num_groups_lrs)])
    sched = build_lr_scheduler(cfg, opt)
    out = []
    for _epoch in range(1, cfg.num_epoch + 1):
        per_group = [g["lr"] / base for g, base in zip(opt.param_groups, num_groups_lrs)]
        assert per_group[0] == pytest.approx(per_group[1], rel=1e-12)  # same factor for every group
        out.append(per_group[0])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_reference_factors():
    cfg = make_cfg(num_epoch=60, warmup_epochs=5, warmup_factor=0.1, warmup_method="linear",
                   lrscheduler="cosine", target_lr=0.0)
    f = factors_per_epoch(cfg)
    assert f[:7] == pytest.approx([0.1, 0.28, 0.46, 0.64, 0.82, 1.0, 0.999185], abs=1e-6)
    assert f[33 - 1] == pytest.approx(0.514278, abs=1e-6)
    assert f[59 - 1] == pytest.approx(0.003259, abs=1e-6)
    assert f[60 - 1] == pytest.approx(0.000815, abs=1e-6)
    # independent formula for every epoch
    for epoch, got in enumerate(f, start=1):
        k = epoch - 1
        if k < 5:
            ref = 0.1 * (1 - k / 5) + k / 5
        else:
            ref = 0.5 * (1 + math.cos(math.pi * (k - 5) / 55))
        assert got == pytest.approx(ref, abs=1e-12), epoch
    assert min(f) > 0


def test_step_schedule_with_milestones():
    cfg = make_cfg(num_epoch=60, warmup_epochs=5, warmup_factor=0.1, warmup_method="linear",
                   lrscheduler="step", milestones=[20, 50], gamma=0.1)
    f = factors_per_epoch(cfg)
    for epoch, got in enumerate(f, start=1):
        k = epoch - 1
        if k < 5:
            ref = 0.1 * (1 - k / 5) + k / 5
        else:
            ref = 0.1 ** sum(1 for m in (20, 50) if m <= k)
        assert got == pytest.approx(ref, rel=1e-9), epoch
    assert f[20 - 1] == pytest.approx(1.0) and f[21 - 1] == pytest.approx(0.1)
    assert f[50 - 1] == pytest.approx(0.1) and f[51 - 1] == pytest.approx(0.01)


def test_constant_warmup_and_target_lr():
    cfg = make_cfg(num_epoch=10, warmup_epochs=2, warmup_factor=0.3, warmup_method="constant",
                   lrscheduler="cosine", target_lr=0.0)
    f = factors_per_epoch(cfg)
    assert f[:3] == pytest.approx([0.3, 0.3, 1.0])
    # target_lr is an absolute lr: lr = target + (base - target) * cos-factor
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.Adam([{"params": params, "lr": 1e-3}])
    cfg = make_cfg(num_epoch=10, warmup_epochs=0, lrscheduler="cosine", target_lr=1e-4)
    sched = build_lr_scheduler(cfg, opt)
    for _ in range(10):
        opt.step()
        sched.step()
    # k = 10 = total: cos(pi) -> lr = target
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-9)


def test_scheduler_applies_to_real_optimizer_groups(model_and_optimizer):
    cfg, model, _ = model_and_optimizer
    opt = build_optimizer(cfg, model)
    base = {id(g["params"][0]): g["lr"] for g in opt.param_groups}
    sched = build_lr_scheduler(cfg, opt)
    for g in opt.param_groups:  # epoch 1: warmup factor 0.1
        assert g["lr"] == pytest.approx(base[id(g["params"][0])] * 0.1, rel=1e-9)
    for _ in range(6):  # epoch 7
        opt.step()
        sched.step()
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(base[id(g["params"][0])] * 0.999185, rel=1e-5)


def test_a_head_can_give_a_parameter_its_own_lr_weight_decay_and_eps():
    from model.heads import HEADS, ParamRule

    class OwnRules(HEADS["id"]):
        def param_rule(self, name, param):
            if name == "classifier.bias":
                return ParamRule("classifier", weight_decay=0.0, eps=1e-8)
            return ParamRule("cross", lr=3e-4)

    torch.manual_seed(0)
    cfg = make_cfg(loss_names="sdm+id", lr=1e-5, lr_factor=5.0, weight_decay=4e-5, optimizer="Adam",
                   optimizer_eps=1e-3)
    model = build_model(cfg, num_classes=7)
    model.heads["id"].__class__ = OwnRules
    opt = build_optimizer(cfg, model)
    params = dict(model.named_parameters())
    weight, bias = group_of(opt, params["heads.id.classifier.weight"]), group_of(opt, params["heads.id.classifier.bias"])
    assert (weight["lr"], weight["weight_decay"], weight["eps"]) == (3e-4, 4e-5, 1e-3)
    assert (bias["lr"], bias["weight_decay"], bias["eps"]) == (5e-5, 0.0, 1e-8)
    encoder = group_of(opt, params["encoder.visual.conv1.weight"])
    assert (encoder["lr"], encoder["weight_decay"], encoder["eps"]) == (1e-5, 4e-5, 1e-3)  # the recipe's
    cfg.optimizer = "SGD"
    assert all("eps" not in g for g in build_optimizer(cfg, model).param_groups)


def _scheduled(total: int, lr: float = 1e-3, steps: int = 0, state: dict | None = None):
    """An optimizer and WarmupScheduler (total epochs, warmup 2, cosine), ``steps`` steps in or from ``state``."""
    from solver.lr_scheduler import WarmupScheduler
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = WarmupScheduler(opt, total_epochs=total, warmup_epochs=2)
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt, sched


def test_a_resumed_schedule_keeps_the_progress_and_takes_the_new_config():
    from torch.optim.lr_scheduler import LRScheduler
    opt, sched = _scheduled(total=4, steps=3)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    same_opt, same = _scheduled(total=4, state=state)  # unchanged config: exact resume
    assert same.last_epoch == 3 and same_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    same_opt.step(), same.step(), opt.step(), sched.step()
    assert same.get_last_lr() == sched.get_last_lr()
    # num_epoch 4 -> 8 on --resume: epochs 4..8 follow the 8-epoch schedule, as a run planned for 8 would
    longer_opt, longer = _scheduled(total=8, state=state)
    planned_opt, planned = _scheduled(total=8, steps=3)
    lrs = []
    for _ in range(5):
        assert longer_opt.param_groups[0]["lr"] == planned_opt.param_groups[0]["lr"]
        lrs.append(longer_opt.param_groups[0]["lr"])
        longer_opt.step(), longer.step(), planned_opt.step(), planned.step()
    assert lrs == sorted(lrs, reverse=True)  # the cosine only falls
    # torch's own load_state_dict keeps the 4-epoch horizon: past it the cosine climbs back up
    old_opt, old = _scheduled(total=8)
    old_opt.load_state_dict(state["optimizer"])
    LRScheduler.load_state_dict(old, state["scheduler"])
    old_lrs = []
    for _ in range(5):
        old_opt.step(), old.step()
        old_lrs.append(old_opt.param_groups[0]["lr"])
    assert old_lrs[0] == 0 and old_lrs[2] == pytest.approx(1e-3)  # down to 0 at epoch 4, back to the base lr
    # another lr on --resume takes effect at once, at the same point of the schedule
    lower_opt, lower = _scheduled(total=4, lr=1e-4, state=state)
    assert lower_opt.param_groups[0]["lr"] == lower.lr_at(1e-4, 3) == pytest.approx(sched.lr_at(1e-3, 3) / 10)
