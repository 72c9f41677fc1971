"""train stage: fit the model chosen in params.train on data/prepared/, log curves, save the checkpoint.

``train_rank`` lists the stage's steps in order, each a function a test can call: ``set_up_world`` (threads,
seed, device, process group), ``build_network`` (the model with its starting weights), ``load_training_data``,
``plan_run`` (run length, memory check, warnings), ``agree_resume_point``, ``fit_or_stop`` (fit with reporting,
resume states and Ctrl-C) and ``save_trained``."""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..calibration import MIN_CALIBRATION_IMAGES, Temperature, fit_temperature
from ..cli import log
from ..errors import RuntimeChoiceError, TrainingError
from ..fileio import atomic_dir
from ..model.checkpoint import save_checkpoint
from ..model.inference import predict
from ..model.networks import Network
from ..model.registry import build_model, normalized_channels
from ..params.core import as_dict
from ..params.train import TrainParams, describe_recipe, params_with_recipe
from ..params.train import TrainStageParams as Params
from ..paths import ProjectPaths
from ..prepared import PreparedData, images_file, load_prepared
from ..runtime import (
    available_memory,
    describe_device,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_threads,
    usable_cores,
)
from ..stats import wilson_interval
from .batches import ImageSource, ResidentImages, StreamedImages, keep_resident
from .distributed import (
    SINGLE,
    World,
    broadcast_object,
    check_processes,
    init_process_group,
    launch,
    main_first,
    report_failure,
    threads_per_process,
    world_from_env,
)
from .loop import FitHooks, FitSetup, StepMemory, StopRequested, estimate_step_memory, fit
from .optim import RunLength, run_length
from .reporting import EpochReporter
from .resume import ResumeStateWriter, discard_resume_state, load_resume_state, run_digest
from .transfer import StartingWeights, apply_starting_weights, load_init_checkpoint, load_pretrained
from .watch import TrainingWatch

# A test split that knows an accuracy of 80% only to within more than this (half its 95% interval) gets a warning.
TEST_SPLIT_MAX_HALF_WIDTH = 0.05


def small_split_warnings(counts: dict[str, int], source_hint: str, split: str = "test") -> list[str]:
    """Warnings for a test or validation split too small to mean anything: its total, and classes without
    images in it."""
    warnings, total = [], sum(counts.values())
    low, high = wilson_interval(round(0.8 * total), total)
    if total and (high - low) / 2 > TEST_SPLIT_MAX_HALF_WIDTH:
        consequence = (
            "so runs cannot be told apart"
            if split == "test"
            else "so its curves are mostly noise and a best epoch picked on it is luck"
        )
        warnings.append(
            f"warning: the {'test' if split == 'test' else 'validation'} split has {total} images: an accuracy "
            f"near 80% on it is only known to {low:.2f}..{high:.2f} (95% interval, +-{(high - low) / 2 * 100:.0f} "
            f"points), {consequence}; give it more images ({source_hint})"
        )
    empty = [name for name, count in counts.items() if count == 0]
    if empty and split == "test":
        warnings.append(f"warning: no test images of class(es) {empty}: their accuracy cannot be measured")
    return warnings


def starting_weights(
    config: TrainParams, *, in_channels: int, class_names: list[str], image_size: int, emit: Callable[[str], None]
) -> StartingWeights | None:
    """train.pretrained or train.init_from, loaded and checked; None for a run from scratch."""
    if config.pretrained != "none":
        start = load_pretrained(config.model, config.pretrained, emit, trust=config.trust_weights_file)
        trained_size = start.provenance["trained_image_size"]
        if image_size < trained_size // 2:
            emit(
                f"warning: {config.model}'s ImageNet weights were trained on {trained_size}-pixel images and these "
                f"are {image_size}: they still help, but more with data.image_size nearer {trained_size}"
            )
        return start
    if config.init_from != "none":
        return load_init_checkpoint(
            config.init_from,
            architecture=config.model,
            in_channels=in_channels,
            width=config.width,
            class_names=class_names,
        )
    return None


@contextlib.contextmanager
def stop_on_ctrl_c(emit: Callable[[str], None]) -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C asks training to stop at the next step boundary (with its state saved); a second
    one interrupts at once. Yields the question fit() asks after every step."""
    requested = False

    def handle(signum, frame):
        nonlocal requested
        requested = True
        emit("Ctrl-C: stopping at the end of this step and saving the state (Ctrl-C again to stop at once)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield lambda: requested
    finally:
        signal.signal(signal.SIGINT, previous)


def check_launch(params: Params, paths: ProjectPaths, emit: Callable[[str], None]) -> None:
    """train.processes against this machine (GPUs, memory, cores) before torchrun starts the processes."""
    device = resolve_device(params.base.device)
    available = available_memory(torch.device("cpu"))
    # Every process reads the images itself: kept in host memory (train.in_memory), each holds its own copy.
    files = [images_file(paths.prepared_dir, split) for split in ("train", "val")]
    nbytes = sum(f.stat().st_size for f in files if f.is_file())
    on_host = device.type == "cpu" and keep_resident(params.train.in_memory, nbytes, available)
    check_processes(
        params.train.processes,
        cores=usable_cores(),
        available_bytes=available,
        data_bytes=nbytes if on_host else 0,
        gpus=torch.cuda.device_count() if device.type == "cuda" else None,
        emit=emit,
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def check_step_memory(
    memory: StepMemory,
    *,
    batch_size: int,
    processes_sharing: int,
    available_bytes: int,
    params: Params,
    image_shape: list[int],
    device: torch.device,
) -> None:
    """Refuse a batch whose training step cannot fit in ``available_bytes`` (of ``device``, shared by
    ``processes_sharing`` processes), naming the params that size it, instead of running into the allocator."""
    required = memory.total(batch_size) * processes_sharing
    if required <= available_bytes:
        return
    fits = (available_bytes // processes_sharing - memory.state_bytes) // max(1, memory.activation_bytes_per_image)
    config, shape = params.train, "x".join(map(str, image_shape))
    size_param = (
        f" or data.image_size ({params.data.image_size})"
        if params.data.dataset == "imagefolder"
        else f" ({params.data.dataset}'s images are {shape})"
    )
    raise RuntimeChoiceError(
        f"a training step at train.batch_size = {config.batch_size} (a batch of {batch_size} {shape} images per "
        f"process) needs about {_size(required)} ({memory.activation_bytes_per_image / 2**20:.2f} MiB per image kept "
        f"for the backward pass x {batch_size}, + {_size(memory.state_bytes)} of gradients and optimizer state"
        + (f", x {processes_sharing} processes" if processes_sharing > 1 else "")
        + f") but {device.type} has {_size(available_bytes)} available; lower train.batch_size"
        + (f" (at most {fits} fits)" if fits >= 1 else "")
        + size_param
    )


class SilentReporter:
    """What ranks other than 0 report: nothing (rank 0 writes the console lines, dvclive and TensorBoard)."""

    def __call__(self, record: dict) -> None:
        pass

    def log_images(self, images: torch.Tensor) -> None:
        pass

    def close(self, summary: dict) -> None:
        pass


def train(params: Params, paths: ProjectPaths) -> None:
    """The train stage. With train.processes > 1 (and not already under torchrun) it starts torchrun, which
    runs this again in each process; under torchrun each process trains as its rank. The recipe keys left at
    auto take the model's values here (the checkpoint's params snapshot holds the values used)."""
    emit, world = log("train"), world_from_env()
    resolved = params_with_recipe(params)
    if world.is_main if world is not None else resolved.train.processes == 1:  # said once, by who trains
        emit(describe_recipe(params.train, resolved.train))
    params = resolved
    if world is None and params.train.processes > 1:
        check_launch(params, paths, emit)
        launch(params.train.processes, params.base.threads, emit)
        return
    world = world or SINGLE
    try:
        train_rank(params, paths, world)
    except BaseException as error:
        report_failure(world, error)
        raise
    finally:
        if world.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def train_rank(params: Params, paths: ProjectPaths, world: World) -> None:
    """Train as one rank of ``world`` (the whole job when it is SINGLE); only rank 0 writes."""
    config = params.train
    rank = set_up_world(params, world)
    prepared = load_prepared(paths.prepared_dir, ("train",), optional=("val",))
    built = build_network(config, prepared.meta, rank)
    data = load_training_data(prepared, config, rank.device)
    rank.emit(describe_training(config, built.model, data, prepared.meta))
    length = plan_run(params, prepared.meta, data, built.step_memory, rank)
    resume = agree_resume_point(params, paths, rank, built.start)
    with staged_logs(paths, rank) as logs:
        reporter = open_reporter(logs, rank)
        reporter.log_images(data.train_images.first(config.log_images).cpu())
        outcome = fit_or_stop(config, built, data, rank, resume, length, reporter, paths)
        if world.is_main:
            calibration = calibrate(built.model, data.val, rank, config.batch_size)
            reporter.close(run_summary(rank, length, outcome, calibration))
            save_trained(params, paths, built, rank, length, outcome.train_seconds, calibration)


def calibrate(model: Network, val: tuple | None, rank: Rank, batch_size: int) -> Temperature | None:
    """Temperature scaling fitted on the validation split (imgcls.calibration); None without one."""
    if val is None:
        rank.emit(
            "no validation split: probabilities are left uncalibrated (temperature 1); "
            "set preprocess.val_fraction > 0 to calibrate them"
        )
        return None
    images, labels = val
    if len(labels) < MIN_CALIBRATION_IMAGES:
        rank.emit(
            f"only {len(labels)} validation images: probabilities are left uncalibrated (temperature 1); a "
            f"temperature fitted on fewer than {MIN_CALIBRATION_IMAGES} images chases one or two mistakes. "
            "Raise preprocess.val_fraction (or add images to val/) to calibrate them"
        )
        return None
    started = time.perf_counter()
    logits = predict(model, images, batch_size=batch_size, device=rank.device, precision=rank.precision)
    fitted = fit_temperature(logits, labels)
    rank.emit(
        f"calibration: temperature {fitted.temperature:.3f} fitted on {fitted.images} validation images in "
        f"{time.perf_counter() - started:.1f} s (negative log-likelihood {fitted.nll_before:.4f} -> "
        f"{fitted.nll_after:.4f}); predicted classes unchanged"
    )
    return fitted


def _silent(message: str) -> None:
    """What ranks other than 0 print: nothing."""


@dataclass(frozen=True)
class Rank:
    """This process's place in the run: its world, device, precision, the generator of the batch order, and
    where its lines go (rank 0 prints them, the others are silent)."""

    world: World
    device: torch.device
    precision: str
    generator: torch.Generator
    emit: Callable[[str], None]


def set_up_world(params: Params, world: World) -> Rank:
    """Threads, seeds, device and precision; the process group when ``world`` has several processes."""
    config = params.train
    emit = log("train") if world.is_main else _silent
    set_threads(threads_per_process(params.base.threads, world))
    generator = seed_everything(params.base.seed)
    device = resolve_device(params.base.device)
    if world.size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)  # one GPU per process on each machine
        torch.cuda.set_device(device)
    if config.sync_batchnorm and world.size > 1 and device.type != "cuda":
        raise RuntimeChoiceError(
            "train.sync_batchnorm: true needs CUDA GPUs (torch's SyncBatchNorm runs on GPUs "
            "only); on CPUs each process normalizes over its own part of the batch: set it false"
        )
    precision = resolve_precision(config.precision, device)
    if world.size > 1:
        init_process_group(world, device)
        emit(
            f"rank 0 of {world.size} processes ({world.local_size} on this machine), "
            f"{'nccl' if device.type == 'cuda' else 'gloo'}; BatchNorm statistics "
            + (
                "synchronized across processes (train.sync_batchnorm)"
                if config.sync_batchnorm
                else "per process (train.sync_batchnorm: false)"
            )
        )
    emit(f"device {describe_device(device)}, precision {precision} (train.precision: {config.precision})")
    return Rank(world, device, precision, generator, emit)


@dataclass(frozen=True)
class BuiltModel:
    """The model on its device with its starting weights, and what the checkpoint needs to rebuild it."""

    model: Network  # the plain module (SyncBatchNorm converted where asked for)
    arguments: dict  # build_model's keyword arguments, normalization included
    class_names: list[str]
    start: StartingWeights | None  # None: trained from scratch
    step_memory: StepMemory  # measured on the model before it was converted or moved


def build_network(config: TrainParams, meta: dict, rank: Rank) -> BuiltModel:
    """train.model for the prepared data (``meta``), with its starting weights; on ``rank.device``."""
    channels, height, width = meta["image_shape"]
    emit = rank.emit
    with main_first(rank.world):  # torchvision's weights: rank 0 fills torch's cache, the others then read it
        start = starting_weights(
            config, in_channels=channels, class_names=meta["class_names"], image_size=height, emit=emit
        )
    # The normalization the weights were trained with: the data's own from scratch (repeated to RGB for the
    # torchvision networks), the loaded weights' otherwise.
    arguments = model_arguments(config, meta, start)
    model = build_model(config.model, **arguments)
    if start:
        apply_and_describe_start(model, start, config, len(meta["class_names"]), emit)
    # Measured on the plain model (SyncBatchNorm's forward would talk to the other ranks); checked by plan_run,
    # when the batch size and the memory left after the data are known.
    try:
        step_memory = estimate_step_memory(
            model,
            (channels, height, width),
            config=config,
            device=rank.device,
            precision=rank.precision,
            processes=rank.world.size,
        )
    except (RuntimeError, AssertionError, ValueError) as error:  # vit_*: "Wrong image height!"; pools past 1 px
        raise TrainingError(
            f"train.model = {config.model!r} fails on {channels}x{height}x{width} images "
            f"({type(error).__name__}: {str(error)[:200]})",
            advice="set data.image_size to a size it takes (torchvision's ViT networks take only 224) "
            "or choose another train.model",
        ) from None
    if config.sync_batchnorm and rank.world.size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(rank.device, memory_format=torch.channels_last)
    return BuiltModel(model, arguments, meta["class_names"], start, step_memory)


def model_arguments(config: TrainParams, meta: dict, start: StartingWeights | None = None) -> dict:
    """build_model's keyword arguments for train.model on the prepared data (``meta``): the normalization
    is the data's own from scratch (repeated to RGB for the torchvision networks), the loaded weights'
    otherwise."""
    channels, height, _ = meta["image_shape"]
    repeat = normalized_channels(config.model, channels) // channels
    mean, std = (start.mean, start.std) if start else (meta["mean"] * repeat, meta["std"] * repeat)
    return {
        "in_channels": channels,
        "num_classes": len(meta["class_names"]),
        "image_size": height,
        "mean": mean,
        "std": std,
        "width": config.width,
        "whiten_bias_epochs": config.whiten_bias_epochs,
    }


def apply_and_describe_start(
    model: Network, start: StartingWeights, config: TrainParams, classes: int, emit: Callable[[str], None]
) -> None:
    """Load ``start`` into ``model`` and say where it came from and how it trains."""
    where = f"train.{'pretrained' if config.pretrained != 'none' else 'init_from'} = {start.provenance['file']}"
    apply_starting_weights(model, start, where)
    emit(
        f"starting from {where} (sha256 {start.provenance['sha256'][:12]}): "
        + ("head replaced for " + str(classes) + " classes" if start.head_replaced else "same classes, head kept")
        + f"; loaded weights train at train.backbone_lr_scale = {config.backbone_lr_scale} x the rate"
        + (f", frozen for the first {config.freeze_backbone_epochs} epoch(s)" if config.freeze_backbone_epochs else "")
    )


@dataclass(frozen=True)
class TrainingData:
    """The training split as fit() takes it, and the validation split (None when there is none)."""

    train_images: ImageSource
    train_labels: torch.Tensor  # int64 (N,) on the device
    val: tuple | None  # (uint8 images: a tensor on the device, or the reader when streamed; labels on the device)
    nbytes: int  # of the images on disk, both splits
    resident: bool  # kept in memory (train.in_memory), else read batch by batch


def load_training_data(prepared: PreparedData, config: TrainParams, device: torch.device) -> TrainingData:
    """The prepared images kept in memory on ``device``, or read from disk batch by batch (train.in_memory)."""
    readers = {split: reader for split, (reader, _) in prepared.splits.items()}
    nbytes = sum(reader.nbytes for reader in readers.values())
    resident = keep_resident(config.in_memory, nbytes, available_memory(device))
    if resident:
        train_images = ResidentImages(torch.from_numpy(readers["train"].load()).to(device))
    else:
        train_images = StreamedImages(readers["train"], device)
    train_labels = torch.from_numpy(prepared.splits["train"][1]).to(device)
    val = None
    if "val" in prepared.splits:
        val_images = torch.from_numpy(readers["val"].load()).to(device) if resident else readers["val"]
        val = (val_images, torch.from_numpy(prepared.splits["val"][1]).to(device))
    return TrainingData(train_images, train_labels, val, nbytes, resident)


def describe_training(config: TrainParams, model: Network, data: TrainingData, meta: dict) -> str:
    return (
        f"{config.model}: {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{len(data.train_images)} training images of shape {list(meta['image_shape'])}; "
        f"{data.nbytes / 1e6:,.0f} MB of images "
        + ("kept in memory" if data.resident else "read from disk batch by batch")
        + f" (train.in_memory: {config.in_memory})"
    )


def plan_run(params: Params, meta: dict, data: TrainingData, step_memory: StepMemory, rank: Rank) -> RunLength:
    """The run's batch size and epochs, with the notes and warnings that explain them; refuses a step that
    cannot fit in memory and warns about a test split too small to measure."""
    world, device, emit = rank.world, rank.device, rank.emit
    length = run_length(len(data.train_images), params.train, world.size)
    for line in length.notes + length.warnings:
        emit(line)
    # The processes on one machine share its memory on the CPU; on CUDA each has a GPU of its own.
    check_step_memory(
        step_memory,
        batch_size=length.batch_size // world.size,
        processes_sharing=world.local_size if device.type == "cpu" else 1,
        available_bytes=available_memory(device),
        params=params,
        image_shape=meta["image_shape"],
        device=device,
    )
    counts = meta.get("counts", {})
    if counts.get("test") is not None:
        hint = (
            "a test/ folder, data.test_fraction or data.val_folder"
            if meta["dataset"] == "imagefolder"
            else "data.limit keeps fewer"
        )
        for line in small_split_warnings(counts["test"], hint):
            emit(line)
    if counts.get("val"):
        hint = "raise preprocess.val_fraction, or add images to val/ where data.val_folder: val makes it the split"
        for line in small_split_warnings(counts["val"], hint, split="val"):
            emit(line)
    return length


@dataclass(frozen=True)
class ResumePoint:
    """What every rank continues from: rank 0's resume state (None: from the start) and its run digest."""

    state: dict | None
    digest: str | None  # rank 0's (the one that writes states); None on the other ranks


def resume_digest(params: Params, paths: ProjectPaths, start: StartingWeights | None, world: World) -> str:
    """The digest a resume state must carry to continue this run: params, data, code, the starting weights
    and the number of processes (a state from another world size is not used)."""
    extra = (start.provenance["sha256"] if start else "") + (f"|world {world.size}" if world.size > 1 else "")
    return run_digest(params, paths.prepared_dir, extra=extra)


def agree_resume_point(params: Params, paths: ProjectPaths, rank: Rank, start: StartingWeights | None) -> ResumePoint:
    """Rank 0 reads the saved state and hands it to the others (they may be on other machines)."""
    digest, state = None, None
    if rank.world.is_main:
        digest = resume_digest(params, paths, start, rank.world)
        state = load_resume_state(paths.resume_state, digest, rank.emit)
    return ResumePoint(broadcast_object(state, rank.world), digest)


@dataclass
class ResumeVerdict:
    """fit()'s ``on_resume`` for the stage: says whether the state is used, and deletes one that is not."""

    state: dict | None
    path: Path
    epochs: int
    world: World
    emit: Callable[[str], None]
    resumed_seconds: float = 0.0  # training time before the stop, where the state is used

    def __call__(self, problem: str | None) -> None:
        if problem is None:
            self.resumed_seconds = self.state["elapsed_seconds"]
            self.emit(
                f"resuming at step {self.state['step']} (epoch {self.state['epoch'] + 1} of {self.epochs}) from "
                f"{self.path}: the run continues exactly where the last one stopped"
            )
            return
        self.emit(f"discarding resume state {self.path}: {problem}; training from the start")
        if self.world.is_main:
            discard_resume_state(self.path)


@dataclass(frozen=True)
class LogFolders:
    dvclive: Path  # becomes metrics/train
    tensorboard: Path  # becomes data/tensorboard


@contextlib.contextmanager
def staged_logs(paths: ProjectPaths, rank: Rank) -> Iterator[LogFolders | None]:
    """Rank 0 writes this run's curves into empty temporaries that replace metrics/train and data/tensorboard
    only when the run ends with its checkpoint saved: a run that fails or is stopped leaves the previous run's
    curves beside the previous model (dvc.yaml keeps them: persist). Other ranks write none."""
    if not rank.world.is_main:
        yield None
        return
    with (
        atomic_dir(paths.train_log_dir, clean_stale=True) as dvclive,
        atomic_dir(paths.tensorboard_dir, clean_stale=True) as tensorboard,
    ):
        yield LogFolders(dvclive, tensorboard)


def open_reporter(logs: LogFolders | None, rank: Rank) -> EpochReporter | SilentReporter:
    """Rank 0's console, dvclive and TensorBoard reporter (one run's curves, not every run's appended)."""
    if logs is None:
        return SilentReporter()
    return EpochReporter(logs.dvclive, logs.tensorboard, print_line=rank.emit)


@dataclass(frozen=True)
class FitOutcome:
    records: list[dict]  # one per epoch
    train_seconds: float  # of the whole run: a resumed run adds the time spent before the stop


def fit_or_stop(
    config: TrainParams,
    built: BuiltModel,
    data: TrainingData,
    rank: Rank,
    resume: ResumePoint,
    length: RunLength,
    reporter: EpochReporter | SilentReporter,
    paths: ProjectPaths,
) -> FitOutcome:
    """fit() with the stage's reporting, resume states and Ctrl-C; a stop exits with status 130."""
    world, emit = rank.world, rank.emit
    verdict = ResumeVerdict(resume.state, paths.resume_state, length.epochs, world, emit)
    writer = ResumeStateWriter(paths.resume_state, resume.digest, emit) if world.is_main else None
    setup = FitSetup(
        config,
        rank.device,
        rank.precision,
        fine_tune=built.start is not None,
        world=world,
        num_classes=len(built.class_names),
    )
    started = time.perf_counter()
    # Ctrl-C with several processes: torchrun ends them all; the state of the last finished epoch resumes.
    with stop_on_ctrl_c(emit) if world.size == 1 else contextlib.nullcontext(lambda: False) as stop_requested:
        watch = TrainingWatch(config, length.batch_size, built.class_names, emit)

        def on_epoch(record: dict) -> None:
            reporter(record)
            watch(record)

        hooks = FitHooks(on_epoch=on_epoch, save_state=writer, should_stop=stop_requested, on_resume=verdict)
        try:
            records = fit(
                built.model,
                (data.train_images, data.train_labels),
                data.val,
                setup,
                rank.generator,
                resume_from=resume.state,
                hooks=hooks,
            )
        except StopRequested as stop:
            emit(stopped_message(stop, writer, paths))
            raise SystemExit(130) from None
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, keeping the last saved state
            emit(
                "interrupted: "
                + (
                    "run `dvc repro` again to continue from the last saved state"
                    if paths.resume_state.is_file()
                    else "no state saved yet; nothing to resume"
                )
            )
            raise SystemExit(130) from None
    final = watch.final_warning()
    if final is not None:
        emit(final)
    return FitOutcome(records, time.perf_counter() - started + verdict.resumed_seconds)


def stopped_message(stop: StopRequested, writer: ResumeStateWriter | None, paths: ProjectPaths) -> str:
    where = f"batch {stop.progress['batches_done']} of the epoch (step {stop.progress['step']})"
    if writer is not None and writer.saved:
        return (
            f"stopped after {where} with the state saved in {paths.resume_state}; run `dvc repro` again to "
            "continue from there"
        )
    return (
        f"stopped after {where}; its state could not be saved (see the warning above): the next run starts "
        "from the last state that was saved, if any"
    )


def run_summary(rank: Rank, length: RunLength, outcome: FitOutcome, calibration: Temperature | None = None) -> dict:
    """The run's summary metrics (dvclive's metrics.json)."""
    return {
        "temperature": calibration.temperature if calibration else 1.0,
        "train_seconds": outcome.train_seconds,
        "precision": rank.precision,
        "device": rank.device.type,
        "epochs": length.epochs,
        "batch_size": length.batch_size,
        "steps": length.total_steps,
        "processes": rank.world.size,
        "images_per_second": sum(r["images_per_second"] for r in outcome.records) / len(outcome.records),
    }


def save_trained(
    params: Params,
    paths: ProjectPaths,
    built: BuiltModel,
    rank: Rank,
    length: RunLength,
    train_seconds: float,
    calibration: Temperature | None = None,
) -> None:
    """Rank 0: the checkpoint, self-describing; the resume state is no longer needed."""
    save_checkpoint(
        paths.checkpoint,
        built.model,
        architecture=params.train.model,
        arguments=built.arguments,
        class_names=built.class_names,
        mean=built.arguments["mean"],
        std=built.arguments["std"],
        params=as_dict(params),
        extra={
            "train_seconds": train_seconds,
            "precision": rank.precision,
            "device": describe_device(rank.device),
            "epochs": length.epochs,
            "batch_size": length.batch_size,
            "start": built.start.provenance if built.start else None,
            "processes": rank.world.size,
            # temperature scaling fitted on the validation split; None: no split to fit it on (temperature 1)
            "calibration": calibration.as_dict() if calibration else None,
        },
    )
    shutil.rmtree(paths.resume_state.parent, ignore_errors=True)  # done: nothing to resume any more
    rank.emit(f"saved {paths.checkpoint} after {train_seconds:.1f} s")
