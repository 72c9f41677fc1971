"""The training loop, top to bottom: set-up (``make_training_setup``), one step in three phases
(``forward_loss``, ``backward``, ``apply_update``), ``train_one_epoch`` and ``fit``.

bench/profile_step.py times the same set-up and phase functions, so the profile measures this code."""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TrainingError
from ..model.checkpoint import plain_state_dict
from ..model.inference import evaluate_model
from ..model.networks import Network
from ..params import TrainParams
from ..runtime import autocast
from .batches import Augmentation, ImageSource, ResidentImages, iterate_batches
from .distributed import SINGLE, World, all_reduce_sum, wrap
from .optim import REFERENCE_BATCH_SIZE, Lookahead, StepPlan, lr_factor, make_optimizer, run_length
from .resume import random_states, restore_random_states, resume_state_problem

VALIDATION_BATCH_SIZE = 1000


@dataclass
class TrainingSetup:
    """Everything a run decides once, before the first step."""

    batch_size: int
    steps_per_epoch: int
    epochs: int  # train.epochs, or more where train.min_steps asks for them
    frozen_epochs: int  # fine-tuning: the loaded backbone's rate is held at 0 for these first epochs
    plan: StepPlan
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    augmentation: Augmentation
    flip_halves: torch.Tensor  # (N,) bool: the fixed half each image is mirrored in (alternating flips)
    lookahead: Lookahead | None


def make_training_setup(
    model: nn.Module,
    images: ImageSource | torch.Tensor,
    *,
    config: TrainParams,
    generator: torch.Generator,
    fine_tune: bool = False,
    processes: int = 1,
) -> TrainingSetup:
    """Batch size, schedule, optimizer, loss and augmentation for ``config`` on training ``images``.
    ``fine_tune``: the model starts from loaded weights; its head and backbone get their own rates."""
    length = run_length(len(images), config, processes)
    batch_size, steps_per_epoch = length.batch_size, length.steps_per_epoch
    total_steps = length.total_steps
    # A warm-up longer than the run (train.epochs: 1 with the default warm-up) ends with the run.
    plan = StepPlan(
        total_steps=total_steps,
        warmup_steps=min(int(config.warmup_epochs * steps_per_epoch), total_steps),
        schedule=config.schedule,
    )
    lr = config.lr * batch_size / REFERENCE_BATCH_SIZE
    optimizer = make_optimizer(
        model,
        name=config.optimizer,
        lr=lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        bias_lr_scale=config.bias_lr_scale,
        head=model.head_parameter_names() if fine_tune else None,
        backbone_lr_scale=config.backbone_lr_scale,
    )
    augment = config.augment
    return TrainingSetup(
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        epochs=length.epochs,
        # freeze_backbone_epochs >= train.epochs: the head alone, for the whole run (however long min_steps makes it)
        frozen_epochs=(
            0
            if not fine_tune
            else length.epochs
            if config.freeze_backbone_epochs >= config.epochs
            else config.freeze_backbone_epochs
        ),
        plan=plan,
        optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        augmentation=Augmentation(
            flip=augment.flip, translate=augment.translate, alternate_flip=augment.alternate_flip
        ),
        flip_halves=torch.rand(len(images), generator=generator) < 0.5,
        lookahead=Lookahead(model, config.ema) if config.ema > 0 else None,
    )


def epoch_batches(
    setup: TrainingSetup,
    images: ImageSource | torch.Tensor,
    labels: torch.Tensor,
    epoch: int,
    generator: torch.Generator,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    return iterate_batches(
        images,
        labels,
        setup.batch_size,
        generator=generator,
        augmentation=setup.augmentation,
        epoch=epoch,
        flip_halves=setup.flip_halves,
        shard=shard,
    )


def set_rate(optimizer: torch.optim.Optimizer, factor: float, backbone_factor: float = 1.0) -> None:
    """The schedule's ``factor`` on every group; the loaded backbone's groups x ``backbone_factor`` (0: frozen)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor * (backbone_factor if group.get("backbone") else 1.0)


def forward_loss(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: nn.Module,
    device: torch.device,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, classes) and the mean loss, under autocast where the precision asks for it."""
    with autocast(device, precision):
        logits = model(images)
        return logits, loss_fn(logits, labels)


def backward(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()


def apply_update(
    optimizer: torch.optim.Optimizer, lookahead: Lookahead | None, model: nn.Module, step: int, factor: float
) -> None:
    optimizer.step()
    if lookahead is not None:
        lookahead.update(model, step, factor)


@dataclass
class StepMemory:
    """Memory one training step needs beyond the weights themselves, from ``estimate_step_memory``."""

    activation_bytes_per_image: int  # what autograd keeps from the forward pass for the backward, per image
    state_bytes: int  # gradients, optimizer buffers, the lookahead average (and DDP's gradient buckets)

    def total(self, batch_size: int) -> int:
        return self.activation_bytes_per_image * batch_size + self.state_bytes


PROBE_IMAGES = 2  # the smallest batch every model takes in training mode (BatchNorm over a 1x1 map needs two)


def estimate_step_memory(
    model: nn.Module,
    image_shape: tuple[int, int, int],
    *,
    config: TrainParams,
    device: torch.device,
    precision: str,
    processes: int = 1,
) -> StepMemory:
    """What a step of ``model`` on (C, H, W) images needs: one forward pass of PROBE_IMAGES zero images on a
    copy of the model (``model``, its BatchNorm statistics and every random generator are left as they were),
    counting the bytes of the tensors autograd saves for the backward pass (saved_tensors_hooks), per image;
    plus a gradient, the optimizer's buffers and the lookahead average for each trainable weight.

    The saved tensors are the bulk of a step's memory and grow with the batch; the backward pass adds
    transient gradients of about one layer's activations on top, so the real peak is somewhat higher (a
    lower bound: it refuses only what cannot fit)."""
    probe = copy.deepcopy(model).to(device, memory_format=torch.channels_last).train()
    parameters = {t.untyped_storage().data_ptr() for t in list(probe.parameters()) + list(probe.buffers())}
    saved: dict[int, int] = {}  # storage address -> bytes: a tensor saved by several operations counts once

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:  # weights exist whatever the batch
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    images = torch.zeros((PROBE_IMAGES, *image_shape), device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(PROBE_IMAGES, dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws: put back
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            forward_loss(probe, images, labels, nn.CrossEntropyLoss(), device, precision)
    del probe
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers_per_weight = {"adamw": 2, "sgd": 1 if config.momentum > 0 else 0}[config.optimizer]
    copies = 1 + buffers_per_weight + (1 if processes > 1 else 0)  # the gradient, optimizer, DDP's buckets
    lookahead = (
        sum(v.numel() * v.element_size() for v in model.state_dict().values() if v.is_floating_point())
        if config.ema > 0
        else 0
    )
    return StepMemory(
        activation_bytes_per_image=-(-sum(saved.values()) // PROBE_IMAGES), state_bytes=copies * trainable + lookahead
    )


class StopRequested(Exception):
    """Raised at a step boundary when ``should_stop`` said so (Ctrl-C); carries where the epoch stood."""

    def __init__(self, progress: dict):
        super().__init__(f"stopped after {progress['batches_done']} batches of the epoch")
        self.progress = progress


def train_one_epoch(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    setup: TrainingSetup,
    *,
    device: torch.device,
    precision: str,
    first_step: int,
    progress_label: str = "",
    done: dict | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    backbone_factor: float = 1.0,
    world: World = SINGLE,
) -> dict:
    """One pass over ``batches``; returns loss, accuracy, images, seconds and the next step number.

    ``done`` continues an epoch stopped part-way (from StopRequested.progress): its first batches are drawn
    again, so the random generator moves exactly as before, but not trained on. ``should_stop`` is asked
    after every step; when it says yes, StopRequested leaves at that step boundary."""
    model.train()
    done = done or {"batches_done": 0, "loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
    step, seen = first_step, done["seen"]
    total_loss = torch.tensor(done["loss"], device=device)
    correct = torch.tensor(done["correct"], device=device)
    started = time.perf_counter() - done["seconds"]
    bar = _progress_bar(setup.steps_per_epoch, progress_label) if world.is_main else None
    for index, (images, labels) in enumerate(batches):
        if index < done["batches_done"]:
            continue  # trained on before the stop
        factor = lr_factor(step, setup.plan.total_steps, setup.plan.warmup_steps, setup.plan.schedule)
        set_rate(setup.optimizer, factor, backbone_factor)
        logits, loss = forward_loss(model, images, labels, setup.loss_fn, device, precision)
        backward(setup.optimizer, loss)
        apply_update(setup.optimizer, setup.lookahead, model, step, factor)
        # Accumulate on the device; one sync per epoch instead of one per step.
        total_loss += loss.detach() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        step += 1
        if bar is not None:
            bar.update(1)
        if should_stop():
            if bar is not None:
                bar.close()
            raise StopRequested(
                {
                    "batches_done": index + 1,
                    "step": step,
                    "loss": float(total_loss),
                    "correct": float(correct),
                    "seen": seen,
                    "seconds": time.perf_counter() - started,
                }
            )
    if bar is not None:
        bar.close()
    # Every rank's sums: the epoch's loss and accuracy over the whole global batch, on every rank.
    loss_sum, correct_sum, seen = all_reduce_sum([float(total_loss), float(correct), float(seen)], device, world)
    seconds = time.perf_counter() - started
    return {
        "loss": loss_sum / max(seen, 1),
        "accuracy": correct_sum / max(seen, 1),
        "images": int(seen),
        "seconds": seconds,
        "next_step": step,
    }


def _progress_bar(total: int, label: str):
    if not sys.stderr.isatty():
        return None  # quiet in CI and in DVC's captured output
    from tqdm import tqdm

    return tqdm(total=total, desc=label, leave=False, unit="batch")


def fit(
    model: Network,
    train: tuple[ImageSource | torch.Tensor, torch.Tensor],
    val: tuple | None,
    *,
    config: TrainParams,
    device: torch.device,
    precision: str,
    generator: torch.Generator,
    on_epoch: Callable[[dict], None] = lambda record: None,
    resume_from: dict | None = None,
    save_state: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    fine_tune: bool = False,
    world: World = SINGLE,
    on_resume: Callable[[str | None], None] = lambda problem: None,
) -> list[dict]:
    """Train ``model`` (on ``device``) for ``config.epochs`` (or more: train.min_steps); returns one record
    per epoch.

    ``train`` is (images: a ResidentImages or StreamedImages source, or a uint8 tensor (N, C, H, W); int64
    labels on the device); ``val`` is (uint8 images as a tensor or an NpyReader, labels). ``model`` stays
    the plain module: a compiled wrapper, if asked for, is used for the steps only.

    ``save_state`` receives everything needed to continue exactly: after every epoch but the last, and at the
    step boundary where ``should_stop`` (asked after every step) said yes, before StopRequested leaves.
    ``resume_from`` is such a state: the run continues from it (the finished epochs' records are replayed
    through ``on_epoch`` first) and ends with the weights an uninterrupted run would have. It is checked
    against this model, optimizer and run before any of it is applied; ``on_resume`` hears the verdict: None
    (resuming), or why it does not fit, and then the run starts from the beginning as if there were no state.

    ``fine_tune``: ``model`` holds loaded starting weights (train.pretrained or train.init_from), so no
    data-dependent initialisation; the backbone trains at train.backbone_lr_scale x the rate, and not at all
    for the first train.freeze_backbone_epochs epochs.

    ``world``: one rank of a data-parallel run (imgcls.train.distributed): the model is wrapped in
    DistributedDataParallel for the steps, each rank takes its part of every global batch, the epoch's
    loss and accuracy are summed over the ranks, and only rank 0 validates (``on_epoch`` and ``save_state``
    are the caller's to silence on the other ranks).
    """
    images, labels = train
    if isinstance(images, torch.Tensor):
        images = ResidentImages(images)
    if model.init_images and not fine_tune:
        model.initialize_from_data(images.first(model.init_images))
    setup = make_training_setup(
        model, images, config=config, generator=generator, fine_tune=fine_tune, processes=world.size
    )
    epochs = setup.epochs
    records, step, first_epoch, elapsed_before, done = [], 0, 1, 0.0, None
    if resume_from is not None:
        # Nothing is applied until all of it is known to fit: a half-applied state would train neither the
        # resumed run nor a fresh one. The set-up above drew from the generator, but a fresh run draws the same.
        problem = resume_state_problem(
            resume_from,
            model=model,
            optimizer=setup.optimizer,
            lookahead_state=setup.lookahead.state if setup.lookahead is not None else None,
            steps_per_epoch=setup.steps_per_epoch,
            epochs=epochs,
        )
        on_resume(problem)
        if problem is not None:
            resume_from = None
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        setup.optimizer.load_state_dict(resume_from["optimizer"])
        if setup.lookahead is not None:
            for name, value in resume_from["lookahead"].items():
                setup.lookahead.state[name].copy_(value)
        restore_random_states(resume_from["random"], generator)
        step, first_epoch, done = resume_from["step"], resume_from["epoch"] + 1, resume_from["epoch_progress"]
        elapsed_before = resume_from["elapsed_seconds"]
        for record in resume_from["records"]:  # the logs DVC deleted with the stage's outputs
            records.append(record)
            on_epoch(record)
    if world.size > 1:
        # Ranks share the batch order (their own generator) but not dropout's draws: each its own stream.
        torch.manual_seed(torch.initial_seed() + 1_000_003 * world.rank + step)

    def wrapped() -> nn.Module:
        # DDP starts every rank from rank 0's weights and all-reduces the parameters that train at the time it
        # is built: after any resume, and again whenever the model's own schedule freezes one (fast: the
        # whitening bias after train.whiten_bias_epochs).
        distributed = wrap(model, world, device)
        return torch.compile(distributed) if config.compile else distributed

    def trainable() -> tuple[bool, ...]:
        return tuple(p.requires_grad for p in model.parameters())

    step_model, wrapped_for = wrapped(), trainable()
    started = time.perf_counter() - elapsed_before

    def state(epochs_done: int, random: dict, epoch_progress: dict | None) -> dict:
        return {
            "epoch": epochs_done,
            "step": step,
            "epoch_progress": epoch_progress,
            "model": plain_state_dict(model),
            "optimizer": setup.optimizer.state_dict(),
            "lookahead": setup.lookahead.state if setup.lookahead is not None else None,
            "random": random,
            "records": records,
            "elapsed_seconds": time.perf_counter() - started,
        }

    for epoch in range(first_epoch, epochs + 1):
        model.start_epoch(epoch - 1)
        if world.size > 1 and trainable() != wrapped_for:
            step_model, wrapped_for = wrapped(), trainable()
        # The generators as the epoch starts: a stop inside it restarts the epoch's draws from here.
        epoch_start = random_states(generator) if save_state is not None else None
        try:
            result = train_one_epoch(
                step_model,
                epoch_batches(setup, images, labels, epoch, generator, world.shard),
                setup,
                device=device,
                precision=precision,
                first_step=step,
                progress_label=f"epoch {epoch}/{epochs}",
                done=done,
                should_stop=should_stop,
                backbone_factor=0.0 if epoch <= setup.frozen_epochs else 1.0,
                world=world,
            )
        except StopRequested as stop:
            step = stop.progress["step"]
            if save_state is not None:
                save_state(state(epoch - 1, epoch_start, stop.progress))
            raise
        done = None
        step = result.pop("next_step")
        if setup.lookahead is not None and epoch == epochs:
            setup.lookahead.finish(model)
        record = {
            "epoch": epoch,
            "train_loss": result["loss"],
            "train_accuracy": result["accuracy"],
            "images_per_second": result["images"] / result["seconds"],
            "epoch_seconds": result["seconds"],
        }
        if val is not None and len(val[0]) and world.is_main:
            metrics = evaluate_model(
                model, val[0], val[1], batch_size=VALIDATION_BATCH_SIZE, device=device, precision=precision
            )
            record.update(val_loss=metrics["loss"], val_accuracy=metrics["accuracy"])
        record["elapsed_seconds"] = time.perf_counter() - started
        if not math.isfinite(record["train_loss"]):
            raise TrainingError(
                f"the training loss became {record['train_loss']} in epoch {epoch}: the run diverged and its model "
                f"would be useless. Lower train.lr ({config.lr}) or raise train.batch_size ({config.batch_size}"
                + (
                    f"; this run's batch of {setup.batch_size} was cut by train.min_batches_per_epoch"
                    if setup.batch_size < config.batch_size
                    else ""
                )
                + "); "
                "images with (nearly) no variation inside them also whiten badly with train.model: fast"
            )
        records.append(record)
        on_epoch(record)
        if save_state is not None and epoch < epochs:
            save_state(state(epoch, random_states(generator), None))
    model.finish_training()
    return records
