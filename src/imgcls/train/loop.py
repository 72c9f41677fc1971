"""The training loop, top to bottom: set-up (``make_training_setup``), one step in three phases
(``forward_loss``, ``backward``, ``apply_update``; together ``train_step``), ``train_one_epoch`` and ``fit``,
which takes the run's fixed ``FitSetup`` and optional ``FitHooks`` and keeps where it stands in a ``RunState``.

bench/profile_step.py times the same set-up and phase functions, so the profile measures this code."""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import TrainingError
from ..model.checkpoint import plain_state_dict
from ..model.inference import evaluate_model, to_float_images
from ..model.networks import Network
from ..params.train import TrainParams
from ..runtime import autocast
from ..stats import prediction_spread
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
    num_classes: int = 0,
) -> TrainingSetup:
    """Batch size, schedule, optimizer, loss and augmentation for ``config`` on training ``images``
    (``num_classes``: the width of mixup's and cutmix's soft targets, needed when either is on).
    ``fine_tune``: the model starts from loaded weights; its head and backbone get their own rates."""
    length = run_length(len(images), config, processes)
    # A warm-up longer than the run (train.epochs: 1 with the default warm-up) ends with the run.
    plan = StepPlan(
        total_steps=length.total_steps,
        warmup_steps=min(int(config.warmup_epochs * length.steps_per_epoch), length.total_steps),
        schedule=config.schedule,
    )
    augment = config.augment
    return TrainingSetup(
        batch_size=length.batch_size,
        steps_per_epoch=length.steps_per_epoch,
        epochs=length.epochs,
        frozen_epochs=frozen_backbone_epochs(config, length.epochs, fine_tune),
        plan=plan,
        optimizer=recipe_optimizer(model, config, length.batch_size, fine_tune),
        loss_fn=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
        augmentation=Augmentation(
            flip=augment.flip,
            translate=augment.translate,
            alternate_flip=augment.alternate_flip,
            crop_scale=augment.crop_scale,
            color_jitter=augment.color_jitter,
            policy=augment.policy,
            mixup=augment.mixup,
            cutmix=augment.cutmix,
            num_classes=num_classes,
        ),
        flip_halves=torch.rand(len(images), generator=generator) < 0.5,
        lookahead=Lookahead(model, config.ema) if config.ema > 0 else None,
    )


def recipe_optimizer(model: nn.Module, config: TrainParams, batch_size: int, fine_tune: bool) -> torch.optim.Optimizer:
    """train.optimizer at train.lr scaled to ``batch_size`` (sgd: linearly; adamw: by the square root, as
    Adam's steps do not grow with the gradient's size); fine-tuning gives the head and backbone own groups."""
    ratio = batch_size / REFERENCE_BATCH_SIZE
    return make_optimizer(
        model,
        name=config.optimizer,
        lr=config.lr * (ratio if config.optimizer == "sgd" else math.sqrt(ratio)),
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        bias_lr_scale=config.bias_lr_scale,
        head=model.head_parameter_names() if fine_tune else None,
        backbone_lr_scale=config.backbone_lr_scale,
    )


def frozen_backbone_epochs(config: TrainParams, epochs: int, fine_tune: bool) -> int:
    """The first epochs in which the loaded backbone's rate is held at 0 (train.freeze_backbone_epochs)."""
    if not fine_tune:
        return 0
    # freeze_backbone_epochs >= train.epochs: the head alone, for the whole run (however long min_steps makes it)
    return epochs if config.freeze_backbone_epochs >= config.epochs else config.freeze_backbone_epochs


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


def _ignore(value: object) -> None:
    pass


def _never() -> bool:
    return False


@dataclass(frozen=True)
class FitSetup:
    """How fit() trains, fixed for the run: the recipe, where it runs, and how the model starts.

    ``fine_tune``: the model holds loaded starting weights (train.pretrained or train.init_from), so no
    data-dependent initialisation; the backbone trains at train.backbone_lr_scale x the rate, and not at all
    for the first train.freeze_backbone_epochs epochs.

    ``world``: one rank of a data-parallel run (imgcls.train.distributed): the model is wrapped in
    DistributedDataParallel for the steps, each rank takes its part of every global batch, the epoch's
    loss and accuracy are summed over the ranks, and only rank 0 validates (the hooks ``on_epoch`` and
    ``save_state`` are the caller's to silence on the other ranks)."""

    config: TrainParams
    device: torch.device
    precision: str
    fine_tune: bool = False
    world: World = SINGLE
    num_classes: int = 0  # the model's classes (mixup's and cutmix's soft targets); 0: the labels' largest + 1


@dataclass(frozen=True)
class FitHooks:
    """What fit() tells its caller and asks it; each is optional.

    ``on_epoch`` hears each epoch's record. ``save_state`` receives everything needed to continue exactly:
    after every epoch but the last, and at the step boundary where ``should_stop`` (asked after every step)
    said yes, before StopRequested leaves. ``on_resume`` hears the verdict on a resume state before any of it
    is applied: None (resuming), or why it does not fit this run."""

    on_epoch: Callable[[dict], None] = _ignore
    save_state: Callable[[dict], None] | None = None
    should_stop: Callable[[], bool] = _never
    on_resume: Callable[[str | None], None] = _ignore


@dataclass
class RunState:
    """Where a run stands between epochs: what a resume state saves, and what fit() continues from."""

    step: int = 0  # optimizer steps taken
    next_epoch: int = 1
    epoch_progress: dict | None = None  # a part-trained epoch (StopRequested.progress), continued first
    records: list[dict] = field(default_factory=list)  # one per finished epoch
    elapsed_before: float = 0.0  # training seconds of the runs before a stop
    started: float = 0.0  # time.perf_counter() at the (virtual) start: elapsed seconds count from it


@dataclass
class EpochTally:
    """An epoch's running sums, kept on the device (one sync per epoch instead of one per step)."""

    batches_done: int
    loss: torch.Tensor
    correct: torch.Tensor
    seen: int
    started: float

    @classmethod
    def resume(cls, done: dict | None, device: torch.device) -> EpochTally:
        """A fresh tally, or the one of an epoch stopped part-way (StopRequested.progress)."""
        done = done or {"batches_done": 0, "loss": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
        return cls(
            batches_done=done["batches_done"],
            loss=torch.tensor(done["loss"], device=device),
            correct=torch.tensor(done["correct"], device=device),
            seen=done["seen"],
            started=time.perf_counter() - done["seconds"],
        )

    def add(self, logits: torch.Tensor, loss: torch.Tensor, labels: torch.Tensor) -> None:
        """``labels``: class indices (B,), or mixup/cutmix's soft targets (B, classes), scored by their largest."""
        self.loss += loss.detach() * len(labels)
        hard = labels.argmax(1) if labels.ndim == 2 else labels
        self.correct += (logits.detach().argmax(1) == hard).sum()
        self.seen += len(labels)

    def progress(self, batches_done: int, step: int) -> dict:
        """Where the epoch stands, as StopRequested carries it (and a resume state saves it)."""
        return {
            "batches_done": batches_done,
            "step": step,
            "loss": float(self.loss),
            "correct": float(self.correct),
            "seen": self.seen,
            "seconds": time.perf_counter() - self.started,
        }


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    training: TrainingSetup,
    setup: FitSetup,
    step: int,
    backbone_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step at the schedule's rate for ``step``; returns the logits (B, classes) and the loss."""
    factor = lr_factor(step, training.plan.total_steps, training.plan.warmup_steps, training.plan.schedule)
    set_rate(training.optimizer, factor, backbone_factor)
    logits, loss = forward_loss(model, images, labels, training.loss_fn, setup.device, setup.precision)
    backward(training.optimizer, loss)
    apply_update(training.optimizer, training.lookahead, model, step, factor)
    return logits, loss


def train_one_epoch(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    training: TrainingSetup,
    setup: FitSetup,
    *,
    first_step: int,
    done: dict | None = None,
    should_stop: Callable[[], bool] = _never,
    backbone_factor: float = 1.0,
    progress_label: str = "",
) -> dict:
    """One pass over ``batches``; returns loss, accuracy, images, seconds and the next step number.

    ``done`` continues an epoch stopped part-way (from StopRequested.progress): its first batches are drawn
    again, so the random generator moves exactly as before, but not trained on. ``should_stop`` is asked
    after every step; when it says yes, StopRequested leaves at that step boundary."""
    model.train()
    tally, step = EpochTally.resume(done, setup.device), first_step
    bar = _progress_bar(training.steps_per_epoch, progress_label) if setup.world.is_main else None
    for index, (images, labels) in enumerate(batches):
        if index < tally.batches_done:
            continue  # trained on before the stop
        logits, loss = train_step(model, images, labels, training, setup, step, backbone_factor)
        tally.add(logits, loss, labels)
        step += 1
        if bar is not None:
            bar.update(1)
        if should_stop():
            if bar is not None:
                bar.close()
            raise StopRequested(tally.progress(index + 1, step))
    if bar is not None:
        bar.close()
    # Every rank's sums: the epoch's loss and accuracy over the whole global batch, on every rank.
    totals = [float(tally.loss), float(tally.correct), float(tally.seen)]
    loss_sum, correct_sum, seen = all_reduce_sum(totals, setup.device, setup.world)
    return {
        "loss": loss_sum / max(seen, 1),
        "accuracy": correct_sum / max(seen, 1),
        "images": int(seen),
        "seconds": time.perf_counter() - tally.started,
        "next_step": step,
    }


def _progress_bar(total: int, label: str):
    if not sys.stderr.isatty():
        return None  # quiet in CI and in DVC's captured output
    from tqdm import tqdm

    return tqdm(total=total, desc=label, leave=False, unit="batch")


def trainable_flags(model: nn.Module) -> tuple[bool, ...]:
    return tuple(p.requires_grad for p in model.parameters())


class StepModule:
    """The module the steps run: ``model`` itself, in DistributedDataParallel with several processes, compiled
    with train.compile (``model`` stays the plain module: the checkpoint and validation use it).

    DDP starts every rank from rank 0's weights and all-reduces the parameters that train at the time it is
    built: after any resume, and again whenever the model's own schedule freezes one (fast: the whitening
    bias after train.whiten_bias_epochs)."""

    def __init__(self, model: nn.Module, setup: FitSetup):
        self.model, self.setup = model, setup
        self.module, self.wrapped_for = self._wrap(), trainable_flags(model)

    def _wrap(self) -> nn.Module:
        distributed = wrap(self.model, self.setup.world, self.setup.device)
        return torch.compile(distributed) if self.setup.config.compile else distributed

    def for_epoch(self) -> nn.Module:
        """The module for the next epoch: rebuilt (several processes) where the trainable parameters changed."""
        if self.setup.world.size > 1 and trainable_flags(self.model) != self.wrapped_for:
            self.module, self.wrapped_for = self._wrap(), trainable_flags(self.model)
        return self.module


def resume_run(
    model: Network, training: TrainingSetup, resume_from: dict | None, generator: torch.Generator, hooks: FitHooks
) -> RunState:
    """A fresh RunState, or the one ``resume_from`` continues, with its model, optimizer, lookahead average and
    generators applied. Nothing is applied until all of it is known to fit (``on_resume`` hears the verdict):
    a half-applied state would train neither the resumed run nor a fresh one."""
    if resume_from is None:
        return RunState()
    # The set-up drew from the generator before this check, but a fresh run draws the same.
    problem = resume_state_problem(
        resume_from,
        model=model,
        optimizer=training.optimizer,
        lookahead_state=training.lookahead.state if training.lookahead is not None else None,
        steps_per_epoch=training.steps_per_epoch,
        epochs=training.epochs,
    )
    hooks.on_resume(problem)
    if problem is not None:
        return RunState()
    model.load_state_dict(resume_from["model"])
    training.optimizer.load_state_dict(resume_from["optimizer"])
    if training.lookahead is not None:
        for name, value in resume_from["lookahead"].items():
            training.lookahead.state[name].copy_(value)
    restore_random_states(resume_from["random"], generator)
    run = RunState(
        step=resume_from["step"],
        next_epoch=resume_from["epoch"] + 1,
        epoch_progress=resume_from["epoch_progress"],
        elapsed_before=resume_from["elapsed_seconds"],
    )
    for record in resume_from["records"]:  # the logs DVC deleted with the stage's outputs
        run.records.append(record)
        hooks.on_epoch(record)
    return run


def resume_state(
    model: nn.Module,
    training: TrainingSetup,
    run: RunState,
    epochs_done: int,
    random: dict,
    epoch_progress: dict | None,
) -> dict:
    """Everything needed to continue exactly where ``run`` stands (resume.STATE_KEYS)."""
    return {
        "epoch": epochs_done,
        "step": run.step,
        "epoch_progress": epoch_progress,
        "model": plain_state_dict(model),
        "optimizer": training.optimizer.state_dict(),
        "lookahead": training.lookahead.state if training.lookahead is not None else None,
        "random": random,
        "records": run.records,
        "elapsed_seconds": time.perf_counter() - run.started,
    }


def epoch_record(epoch: int, result: dict, model: nn.Module, val: tuple | None, setup: FitSetup, run: RunState) -> dict:
    """The epoch's line in the logs: training loss and accuracy, speed, and validation (on rank 0)."""
    record = {
        "epoch": epoch,
        "train_loss": result["loss"],
        "train_accuracy": result["accuracy"],
        "images_per_second": result["images"] / result["seconds"],
        "epoch_seconds": result["seconds"],
    }
    if val is not None and len(val[0]) and setup.world.is_main:
        metrics = evaluate_model(
            model, val[0], val[1], batch_size=VALIDATION_BATCH_SIZE, device=setup.device, precision=setup.precision
        )
        spread = prediction_spread(metrics["predictions"].cpu(), val[1].cpu(), metrics["logits"].shape[1])
        record.update(
            val_loss=metrics["loss"],
            val_accuracy=metrics["accuracy"],
            val_top_class=spread.top_class,
            val_top_share=spread.top_share,
            val_top_true_share=spread.top_true_share,
            val_chance=spread.chance,
            val_images=spread.images,
        )
    record["elapsed_seconds"] = time.perf_counter() - run.started
    return record


# Training images (unaugmented, spread evenly over the split) recompute_batchnorm runs: enough for stable
# statistics. Its cost is a forward pass over them before each validation: small next to an epoch of a
# large data set, about an epoch's forward passes on a small one (2,048 images of 224 px through resnet18
# are about 3.7 TFLOP).
RECOMPUTE_BATCHNORM_IMAGES = 2048


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, images: ImageSource, batch_size: int, setup: FitSetup) -> None:
    """BatchNorm running statistics recomputed for the weights as they are (train.recompute_batchnorm): reset,
    then the plain average over batches of training images (torch.optim.swa_utils.update_bn, as after
    stochastic weight averaging). Running statistics are an average over past steps at the BatchNorm's
    momentum; when the weights moved fast (or were averaged by the lookahead) they describe another network,
    and the eval-mode model can output one class for everything. Every rank computes the same.

    The images are spread evenly over the split (prepared splits are sorted by class: the first 2,048 of
    10 classes x 500 would be five classes), in full batches of the per-process ``batch_size`` (a last batch
    of one image would fail on a 1x1 feature map); nothing is drawn from any generator."""
    from torch.optim.swa_utils import update_bn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    count = min(len(images), RECOMPUTE_BATCHNORM_IMAGES)
    index = torch.linspace(0, len(images) - 1, count).round().long()  # ascending, distinct
    batch_size = max(2, min(batch_size, count))
    batches = (
        to_float_images(images.take(index[start : start + batch_size]))
        for start in range(0, count - batch_size + 1, batch_size)
    )
    with autocast(setup.device, setup.precision):
        update_bn(batches, model)


def check_finite_loss(record: dict, config: TrainParams, batch_size: int) -> None:
    """A loss that became NaN or infinite stops the run, naming the params to change."""
    if math.isfinite(record["train_loss"]):
        return
    raise TrainingError(
        f"the training loss became {record['train_loss']} in epoch {record['epoch']}: the run diverged and its "
        f"model would be useless. Lower train.lr ({config.lr}) or raise train.batch_size ({config.batch_size}"
        + (
            f"; this run's batch of {batch_size} was cut by train.min_batches_per_epoch"
            if batch_size < config.batch_size
            else ""
        )
        + "); "
        "images with (nearly) no variation inside them also whiten badly with train.model: fast"
    )


def run_epoch(
    epoch: int,
    step_module: StepModule,
    data: tuple[ImageSource, torch.Tensor],
    training: TrainingSetup,
    setup: FitSetup,
    run: RunState,
    generator: torch.Generator,
    hooks: FitHooks,
) -> dict:
    """Train epoch ``epoch`` (1-based) and advance ``run``; a stop saves the state of its step boundary."""
    model = step_module.model
    model.start_epoch(epoch - 1)
    module = step_module.for_epoch()
    # The generators as the epoch starts: a stop inside it restarts the epoch's draws from here.
    epoch_start = random_states(generator) if hooks.save_state is not None else None
    images, labels = data
    try:
        result = train_one_epoch(
            module,
            epoch_batches(training, images, labels, epoch, generator, setup.world.shard),
            training,
            setup,
            first_step=run.step,
            done=run.epoch_progress,
            should_stop=hooks.should_stop,
            backbone_factor=0.0 if epoch <= training.frozen_epochs else 1.0,
            progress_label=f"epoch {epoch}/{training.epochs}",
        )
    except StopRequested as stop:
        run.step = stop.progress["step"]
        if hooks.save_state is not None:
            hooks.save_state(resume_state(model, training, run, epoch - 1, epoch_start, stop.progress))
        raise
    run.epoch_progress = None
    run.step = result.pop("next_step")
    return result


def fit(
    model: Network,
    train: tuple[ImageSource | torch.Tensor, torch.Tensor],
    val: tuple | None,
    setup: FitSetup,
    generator: torch.Generator,
    *,
    resume_from: dict | None = None,
    hooks: FitHooks | None = None,
) -> list[dict]:
    """Train ``model`` (on ``setup.device``) for train.epochs (or more: train.min_steps); returns one record
    per epoch.

    ``train`` is (images: a ResidentImages or StreamedImages source, or a uint8 tensor (N, C, H, W); int64
    labels on the device); ``val`` is (uint8 images as a tensor or an NpyReader, labels). ``model`` stays
    the plain module: a compiled or distributed wrapper is used for the steps only (StepModule).

    ``resume_from`` is a state ``hooks.save_state`` received: the run continues from it (the finished epochs'
    records are replayed through ``hooks.on_epoch`` first) and ends with the weights an uninterrupted run
    would have. It is checked against this model, optimizer and run before any of it is applied; a state
    that does not fit starts the run from the beginning, as if there were none.
    """
    hooks = hooks or FitHooks()
    images, labels = train
    if isinstance(images, torch.Tensor):
        images = ResidentImages(images)
    if model.init_images and not setup.fine_tune:
        model.initialize_from_data(images.first(model.init_images))
    config, world = setup.config, setup.world
    training = make_training_setup(
        model,
        images,
        config=config,
        generator=generator,
        fine_tune=setup.fine_tune,
        processes=world.size,
        num_classes=setup.num_classes or (int(labels.max()) + 1 if len(labels) else 0),
    )
    run = resume_run(model, training, resume_from, generator, hooks)
    if world.size > 1:
        # Ranks share the batch order (their own generator) but not dropout's draws: each its own stream.
        torch.manual_seed(torch.initial_seed() + 1_000_003 * world.rank + run.step)
    step_module = StepModule(model, setup)
    run.started = time.perf_counter() - run.elapsed_before
    for epoch in range(run.next_epoch, training.epochs + 1):
        result = run_epoch(epoch, step_module, (images, labels), training, setup, run, generator, hooks)
        if training.lookahead is not None and epoch == training.epochs:
            training.lookahead.finish(model)
        if config.recompute_batchnorm and (val is not None or epoch == training.epochs):
            recompute_batchnorm(model, images, training.batch_size // setup.world.size, setup)
        record = epoch_record(epoch, result, model, val, setup, run)
        check_finite_loss(record, config, training.batch_size)
        run.records.append(record)
        hooks.on_epoch(record)
        if hooks.save_state is not None and epoch < training.epochs:
            hooks.save_state(resume_state(model, training, run, epoch, random_states(generator), None))
    model.finish_training()
    return run.records
