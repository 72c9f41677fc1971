"""Optimizer, learning-rate schedule and the lookahead EMA of weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

REFERENCE_BATCH_SIZE = 256  # train.lr is the rate at this batch size; it scales linearly with batch size


@dataclass
class StepPlan:
    total_steps: int
    warmup_steps: int
    schedule: str


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier on the base rate: linear warm-up, then constant, cosine or linear decay to 0."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def make_optimizer(model: nn.Module, *, name: str, lr: float, momentum: float, nesterov: bool,
                   weight_decay: float, bias_lr_scale: float) -> torch.optim.Optimizer:
    """Two groups: BatchNorm biases (rate x bias_lr_scale, decay / bias_lr_scale so the decay per step is
    unchanged, as in airbench) and everything else. Frozen parameters are left out."""
    norm_biases, others = [], []
    for module in model.modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm_bias = isinstance(module, nn.modules.batchnorm._BatchNorm) and param_name == "bias"
            (norm_biases if is_norm_bias else others).append(param)
    groups = [
        {"params": others, "lr": lr, "weight_decay": weight_decay, "base_lr": lr},
        {"params": norm_biases, "lr": lr * bias_lr_scale, "weight_decay": weight_decay / bias_lr_scale,
         "base_lr": lr * bias_lr_scale},
    ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay)


class Lookahead:
    """Lookahead EMA of weights (airbench): every ``every`` steps the EMA moves toward the model and the
    model is reset onto the EMA; at the end the model takes the EMA weights."""

    def __init__(self, model: nn.Module, decay_per_step: float, every: int = 5):
        self.every = every
        self.decay = decay_per_step ** every
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, lr_ratio: float) -> None:
        if step % self.every:
            return
        # Follow the model more closely as the rate decays (airbench's alpha schedule: decay * ratio^3).
        decay = self.decay * lr_ratio**3
        for name, value in model.state_dict().items():
            if name in self.state:
                self.state[name].lerp_(value, 1 - decay)
                value.copy_(self.state[name])

    @torch.no_grad()
    def finish(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if name in self.state:
                value.copy_(self.state[name])


