"""Optimizer, learning-rate schedule and the lookahead EMA of weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TrainingError
from ..model.checkpoint import unwrap

REFERENCE_BATCH_SIZE = 256  # train.lr is the rate at this batch size; it scales linearly with batch size
SHORT_RUN_STEPS = 100  # fewer optimizer steps than this rarely train a network: the train stage warns


@dataclass
class RunLength:
    """Batch size, steps and epochs a run really gets, and why they differ from params.yaml."""

    batch_size: int
    steps_per_epoch: int
    epochs: int
    notes: list[str]  # lines for the log: each adjustment, naming the param behind it
    warnings: list[str]

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


def run_length(images: int, config, processes: int = 1) -> RunLength:
    """Fit the recipe to the data: the batch is cut to at most 1/``min_batches_per_epoch`` of the training
    images, and epochs are raised until the run has ``min_steps`` optimizer steps. Large data sets are
    untouched (Fashion-MNIST: 105 steps an epoch at batch 512). With several ``processes`` the (global)
    batch is a multiple of their number, so each takes an equal part."""
    notes, warnings = [], []
    batch_size = max(1, min(config.batch_size, images // config.min_batches_per_epoch))
    if batch_size < config.batch_size:
        notes.append(
            f"batch size {batch_size} instead of train.batch_size {config.batch_size}: {images} training "
            f"images give train.min_batches_per_epoch = {config.min_batches_per_epoch} steps an epoch "
            f"(the rate scales with it: {config.lr} at batch {REFERENCE_BATCH_SIZE})"
        )
    if processes > 1 and (batch_size % processes or batch_size < 2 * processes):
        # Each process takes an equal share of at least 2 images (BatchNorm needs two to normalize over).
        batch_size = max(2 * processes, batch_size - batch_size % processes)
        if batch_size > images:
            raise TrainingError(
                f"{images} training images cannot give each of train.processes = {processes} "
                "processes two images a step; use fewer processes"
            )
        notes.append(
            f"batch size {batch_size}: a multiple of the {processes} processes, each taking "
            f"{batch_size // processes} images of every batch"
        )
    steps_per_epoch = max(1, images // batch_size)
    epochs = max(config.epochs, -(-config.min_steps // steps_per_epoch))
    if epochs > config.epochs:
        notes.append(
            f"{epochs} epochs instead of train.epochs {config.epochs}: {steps_per_epoch} steps an epoch "
            f"reach train.min_steps = {config.min_steps} only then"
        )
    if steps_per_epoch * epochs < SHORT_RUN_STEPS:
        warnings.append(
            f"warning: this run has only {steps_per_epoch * epochs} optimizer steps ({epochs} epochs x "
            f"{steps_per_epoch} batches of {batch_size}); under {SHORT_RUN_STEPS} steps a network rarely "
            "learns much. Raise train.min_steps or train.epochs, or lower train.batch_size"
        )
    return RunLength(batch_size, steps_per_epoch, epochs, notes, warnings)


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


def make_optimizer(
    model: nn.Module,
    *,
    name: str,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    bias_lr_scale: float,
    head: set[str] | None = None,
    backbone_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """Two groups: BatchNorm biases (rate x bias_lr_scale, decay / bias_lr_scale so the decay per step is
    unchanged, as in airbench) and everything else. Frozen parameters are left out.

    Fine-tuning (``head``: the names of the new head's parameters): the two groups are split again into the
    head's and the loaded backbone's, whose rate is x ``backbone_lr_scale`` (groups marked "backbone", so
    set_rate can also hold them at 0 while the backbone is frozen)."""
    groups = []
    for in_backbone in (False,) if head is None else (True, False):
        norm_biases, others = [], []
        for module_name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                full_name = f"{module_name}.{param_name}" if module_name else param_name
                if not param.requires_grad or (head is not None and (full_name not in head) != in_backbone):
                    continue
                is_norm_bias = isinstance(module, nn.modules.batchnorm._BatchNorm) and param_name == "bias"
                (norm_biases if is_norm_bias else others).append(param)
        rate = lr * (backbone_lr_scale if in_backbone else 1.0)
        groups += [
            {"params": others, "lr": rate, "weight_decay": weight_decay, "base_lr": rate, "backbone": in_backbone},
            {
                "params": norm_biases,
                "lr": rate * bias_lr_scale,
                "weight_decay": weight_decay / bias_lr_scale,
                "base_lr": rate * bias_lr_scale,
                "backbone": in_backbone,
            },
        ]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(
        groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, weight_decay=weight_decay
    )


class Lookahead:
    """Lookahead EMA of weights (airbench): every ``every`` steps the EMA moves toward the model and the
    model is reset onto the EMA; at the end the model takes the EMA weights."""

    def __init__(self, model: nn.Module, decay_per_step: float, every: int = 5):
        self.every = every
        self.decay = decay_per_step**every
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, lr_ratio: float) -> None:
        if step % self.every:
            return
        model = unwrap(model)  # the compiled or DDP wrapper's state_dict names carry prefixes
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
