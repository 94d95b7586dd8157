"""Optimizer with IRRA's parameter groups, assigned by module role, and the scheduler.

Roles (declared by each head's ``param_roles``; the encoder and everything else is 'base'):
  base        weights lr, wd                       biases lr*bias_lr_factor, wd_bias
  cross       weights lr*lr_factor, wd             biases lr*bias_lr_factor, wd_bias
  classifier  weights lr*lr_factor, wd             biases lr*lr_factor, wd_bias
(IRRA: new cross-modal modules x5, biases x2 without decay, classifier and MLM head x5.)
A head may also give a parameter its own lr, weight decay or Adam eps (``Head.param_rule``).
With ``no_decay_1d`` every parameter with fewer than 2 dimensions is treated as a bias (TBPS-CLIP's
rule: LayerNorm weights, class embedding and logit scale get no weight decay either).
IRRA makes one group per tensor; we make one group per (lr, weight decay, eps), the same update.
"""
from __future__ import annotations

import torch
from torch import nn

from model.heads import ParamRule

from .lr_scheduler import WarmupScheduler


def param_rule(model: nn.Module, name: str, param: nn.Parameter) -> ParamRule:
    """The optimizer rule of a parameter of a ``TBPSModel`` given its full name."""
    parts = name.split(".")
    if parts[0] == "heads":
        return model.heads[parts[1]].param_rule(".".join(parts[2:]), param)
    return ParamRule()


def lr_and_decay(cfg, role: str, is_bias: bool) -> tuple[float, float]:
    lr = cfg.lr * (cfg.lr_factor if role in ("cross", "classifier") else 1.0)
    if is_bias:
        return (lr if role == "classifier" else cfg.lr * cfg.bias_lr_factor), cfg.weight_decay_bias
    return lr, cfg.weight_decay


def build_param_groups(cfg, model: nn.Module) -> list[dict]:
    groups: dict[tuple[float, float, float | None], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule = param_rule(model, name, param)
        lr, wd = lr_and_decay(cfg, rule.role, name.endswith("bias") or (cfg.no_decay_1d and param.ndim < 2))
        key = (lr if rule.lr is None else rule.lr, wd if rule.weight_decay is None else rule.weight_decay, rule.eps)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "lr": lr, "weight_decay": wd, **({"eps": eps} if eps is not None else {})}
            for (lr, wd, eps), params in groups.items()]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    groups = build_param_groups(cfg, model)
    if cfg.optimizer == "SGD":
        for group in groups:
            group.pop("eps", None)  # SGD has none
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    optim_cls = torch.optim.Adam if cfg.optimizer == "Adam" else torch.optim.AdamW
    return optim_cls(groups, lr=cfg.lr, betas=(cfg.alpha, cfg.beta), eps=cfg.optimizer_eps,
                     fused=True)  # one kernel over all tensors (CPU and CUDA); same update


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer, steps_per_epoch: int = 1) -> WarmupScheduler:
    """The schedule in epochs, or with ``lr_schedule_unit: iteration`` in optimizer steps
    (``steps_per_epoch`` of them per epoch)."""
    steps = steps_per_epoch if cfg.lr_schedule_unit == "iteration" else 1
    return WarmupScheduler(optimizer, mode=cfg.lrscheduler, total_epochs=cfg.num_epoch,
                           warmup_epochs=cfg.warmup_epochs, warmup_factor=cfg.warmup_factor,
                           warmup_method=cfg.warmup_method, milestones=tuple(cfg.milestones),
                           gamma=cfg.gamma, target_lr=cfg.target_lr, steps_per_epoch=steps)
