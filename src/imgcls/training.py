"""Plain training code over in-memory uint8 tensors: batches, augmentation, optimizer, schedule,
lookahead EMA, ``train_one_epoch`` and ``evaluate``."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import autocast

REFERENCE_BATCH_SIZE = 256  # train.lr is the rate at this batch size; it scales linearly with batch size


def to_float_images(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float [0, 1], channels-last (faster convolutions on CPU and GPU)."""
    return images_uint8.float().div_(255).contiguous(memory_format=torch.channels_last)


def batch_flip(images: torch.Tensor, generator: torch.Generator | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror a random half of the batch (or the images selected by ``mask``) left-right."""
    if mask is None:
        mask = torch.rand(len(images), generator=generator, device="cpu") < 0.5
    mask = mask.to(images.device).view(-1, 1, 1, 1)
    return torch.where(mask, images.flip(3), images)


def reflect_pad(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad (N, C, H, W) by ``pad`` pixels on each side, for any dtype (F.pad's reflect mode
    rejects uint8, and padding the uint8 data set once is 4x cheaper than padding float batches)."""
    h, w = images.shape[2], images.shape[3]

    def reflect_index(size: int) -> torch.Tensor:
        index = torch.arange(-pad, size + pad, device=images.device).abs()
        return torch.where(index >= size, 2 * (size - 1) - index, index)

    return images[:, :, reflect_index(h)][:, :, :, reflect_index(w)]


def batch_crop(padded: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """A random (H, W) window of each padded image: a translation by up to ``pad`` pixels each way.
    One slice copy per distinct offset (at most (2 pad + 1)^2) instead of a per-pixel gather."""
    n, c, padded_h, padded_w = padded.shape
    h, w = padded_h - 2 * pad, padded_w - 2 * pad
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(padded.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(padded.device)
    out = torch.empty((n, c, h, w), dtype=padded.dtype, device=padded.device)
    for y in range(2 * pad + 1):
        for x in range(2 * pad + 1):
            chosen = (dy == y) & (dx == x)
            out[chosen] = padded[chosen, :, y:y + h, x:x + w]
    return out


def batch_translate(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after reflect-padding by ``pad`` pixels: each image moves by up to ``pad`` each way."""
    return images if pad == 0 else batch_crop(reflect_pad(images, pad), pad, generator)


@dataclass(frozen=True)
class Augmentation:
    flip: bool
    translate: int
    alternate_flip: bool = False  # airbench: flip a fixed random half in even epochs, the other half in odd ones


def iterate_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, generator: torch.Generator,
    augmentation: Augmentation | None = None, epoch: int = 0, flip_halves: torch.Tensor | None = None,
    drop_last: bool = True, padded_images: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented float batches from uint8 tensors already on the device.

    Augmentation works on uint8 (a quarter of float's bytes) before the conversion to float; with
    ``translate`` it crops from ``padded_images`` (the data set reflect-padded once per fit).
    """
    order = torch.randperm(len(images), generator=generator).to(images.device)
    end = len(images) - (len(images) % batch_size if drop_last and len(images) >= batch_size else 0)
    translate = augmentation.translate if augmentation is not None else 0
    if translate and padded_images is None:
        padded_images = reflect_pad(images, translate)
    for start in range(0, end, batch_size):
        index = order[start:start + batch_size]
        batch = (padded_images if translate else images)[index]  # uint8 (B, C, H[+2p], W[+2p])
        if augmentation is not None and augmentation.flip:
            if augmentation.alternate_flip and flip_halves is not None:
                batch = batch_flip(batch, mask=flip_halves[index.cpu()] ^ bool(epoch % 2))
            else:
                batch = batch_flip(batch, generator)
        if translate:
            batch = batch_crop(batch, translate, generator)
        yield to_float_images(batch), labels[index]


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


@dataclass
class StepPlan:
    total_steps: int
    warmup_steps: int
    schedule: str


def train_one_epoch(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer, *,
    loss_fn: nn.Module, device: torch.device, precision: str, plan: StepPlan, first_step: int,
    steps_in_epoch: int, lookahead: Lookahead | None = None, progress_label: str = "",
) -> dict:
    """One pass over ``batches``; returns loss, accuracy, images, seconds and the next step number."""
    model.train()
    step, total_loss, correct, seen = first_step, torch.zeros((), device=device), torch.zeros((), device=device), 0
    started = time.perf_counter()
    bar = _progress_bar(steps_in_epoch, progress_label)
    for images, labels in batches:
        factor = lr_factor(step, plan.total_steps, plan.warmup_steps, plan.schedule)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        with autocast(device, precision):
            logits = model(images)
            loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if lookahead is not None:
            lookahead.update(model, step, factor)
        # Accumulate on the device; one sync per epoch instead of one per step.
        total_loss += loss.detach() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        step += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    return {"loss": float(total_loss) / max(seen, 1), "accuracy": float(correct) / max(seen, 1), "images": seen,
            "seconds": seconds, "next_step": step}


def _progress_bar(total: int, label: str):
    if not sys.stderr.isatty():
        return None  # quiet in CI and in DVC's captured output
    from tqdm import tqdm

    return tqdm(total=total, desc=label, leave=False, unit="batch")


@torch.no_grad()
def predict(model: nn.Module, images_uint8: torch.Tensor, *, batch_size: int, device: torch.device,
            precision: str) -> torch.Tensor:
    """Float32 logits (N, classes) for uint8 images, in eval mode."""
    model.eval()
    outputs = []
    for start in range(0, len(images_uint8), batch_size):
        batch = to_float_images(images_uint8[start:start + batch_size].to(device))
        with autocast(device, precision):
            outputs.append(model(batch).float())
    return torch.cat(outputs) if outputs else torch.zeros(0)


def evaluate(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
             device: torch.device, precision: str) -> dict:
    """Mean cross-entropy loss, accuracy and predicted classes on a labelled set."""
    logits = predict(model, images_uint8, batch_size=batch_size, device=device, precision=precision)
    labels = labels.to(logits.device)
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
        "logits": logits,
        "predictions": logits.argmax(1),
    }


def fit(
    model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None, *,
    config, device: torch.device, precision: str, generator: torch.Generator,
    on_epoch: Callable[[dict], None] = lambda record: None,
) -> list[dict]:
    """Train ``model`` (on ``device``) for ``config.epochs`` (a TrainParams); returns one record per epoch.

    ``train``/``val`` are (uint8 images (N, C, H, W), int64 labels) on the device. ``model`` stays the
    plain module: a compiled wrapper, if asked for, is used for the steps only.
    """
    images, labels = train
    batch_size = min(config.batch_size, len(images))
    steps_per_epoch = len(images) // batch_size
    plan = StepPlan(total_steps=steps_per_epoch * config.epochs,
                    warmup_steps=int(config.warmup_epochs * steps_per_epoch), schedule=config.schedule)
    lr = config.lr * batch_size / REFERENCE_BATCH_SIZE
    optimizer = make_optimizer(model, name=config.optimizer, lr=lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=config.weight_decay,
                               bias_lr_scale=config.bias_lr_scale)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    fast = config.model == "fast"
    augmentation = Augmentation(flip=config.augment.flip, translate=config.augment.translate, alternate_flip=fast)
    flip_halves = torch.rand(len(images), generator=generator) < 0.5
    padded_images = reflect_pad(images, config.augment.translate) if config.augment.translate else None
    lookahead = Lookahead(model, config.ema) if config.ema > 0 else None
    step_model = torch.compile(model) if config.compile else model
    whiten_bias_steps = int(config.whiten_bias_epochs * steps_per_epoch)
    stem_bias = getattr(getattr(model, "stem", None), "bias", None) if fast else None
    records, step, started = [], 0, time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        if stem_bias is not None and step >= whiten_bias_steps:
            stem_bias.requires_grad_(False)  # airbench trains the whitening bias for the first epochs only
        batches = iterate_batches(images, labels, batch_size, generator=generator, augmentation=augmentation,
                                  epoch=epoch, flip_halves=flip_halves, padded_images=padded_images)
        result = train_one_epoch(step_model, batches, optimizer, loss_fn=loss_fn, device=device,
                                 precision=precision, plan=plan, first_step=step, steps_in_epoch=steps_per_epoch,
                                 lookahead=lookahead, progress_label=f"epoch {epoch}/{config.epochs}")
        step = result.pop("next_step")
        if lookahead is not None and epoch == config.epochs:
            lookahead.finish(model)
        record = {"epoch": epoch, "train_loss": result["loss"], "train_accuracy": result["accuracy"],
                  "images_per_second": result["images"] / result["seconds"], "epoch_seconds": result["seconds"]}
        if val is not None and len(val[0]):
            metrics = evaluate(model, val[0], val[1], batch_size=1000, device=device, precision=precision)
            record.update(val_loss=metrics["loss"], val_accuracy=metrics["accuracy"])
        record["elapsed_seconds"] = time.perf_counter() - started
        records.append(record)
        on_epoch(record)
    if stem_bias is not None:
        stem_bias.requires_grad_(True)
    return records
