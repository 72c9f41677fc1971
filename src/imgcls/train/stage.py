"""train stage: fit the model chosen in params.train on data/prepared/, log curves, save the checkpoint."""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator

import torch

from ..cli import log
from ..errors import RuntimeChoiceError
from ..model.checkpoint import save_checkpoint
from ..model.networks import build_model, normalized_channels
from ..params import Params, TrainParams, as_dict
from ..paths import ProjectPaths
from ..prepared import images_file, load_prepared
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
from .batches import ResidentImages, StreamedImages, keep_resident
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
from .loop import StepMemory, StopRequested, estimate_step_memory, fit
from .optim import run_length
from .reporting import EpochReporter
from .resume import ResumeStateWriter, discard_resume_state, load_resume_state, run_digest
from .transfer import StartingWeights, apply_starting_weights, load_init_checkpoint, load_pretrained

# A test split that knows an accuracy of 80% only to within more than this (half its 95% interval) gets a warning.
TEST_SPLIT_MAX_HALF_WIDTH = 0.05


def small_test_split_warnings(counts: dict[str, int], source_hint: str) -> list[str]:
    """Warnings for a test split too small to mean anything: its total, and classes without test images."""
    warnings, total = [], sum(counts.values())
    low, high = wilson_interval(round(0.8 * total), total)
    if (high - low) / 2 > TEST_SPLIT_MAX_HALF_WIDTH:
        warnings.append(
            f"warning: the test split has {total} images: an accuracy near 80% on it is only known to "
            f"{low:.2f}..{high:.2f} (95% interval, +-{(high - low) / 2 * 100:.0f} points), so runs cannot "
            f"be told apart; give it more images ({source_hint})"
        )
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
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
    runs this again in each process; under torchrun each process trains as its rank."""
    world = world_from_env()
    if world is None and params.train.processes > 1:
        check_launch(params, paths, log("train"))
        launch(params.train.processes, params.base.threads, log("train"))
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
    emit = log("train") if world.is_main else (lambda message: None)
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

    prepared = load_prepared(paths.prepared_dir, ("train",), optional=("val",))
    meta = prepared.meta
    channels, height, width = meta["image_shape"]
    with main_first(world):  # torchvision's weights: rank 0 fills torch's cache, the others then read it
        start = starting_weights(
            config, in_channels=channels, class_names=meta["class_names"], image_size=height, emit=emit
        )
    # The normalization the weights were trained with: the data's own from scratch (repeated to RGB for the
    # torchvision networks), the loaded weights' otherwise.
    repeat = normalized_channels(config.model, channels) // channels
    mean, std = (start.mean, start.std) if start else (meta["mean"] * repeat, meta["std"] * repeat)
    arguments = {
        "in_channels": channels,
        "num_classes": len(meta["class_names"]),
        "image_size": height,
        "mean": mean,
        "std": std,
        "width": config.width,
        "whiten_bias_epochs": config.whiten_bias_epochs,
    }
    model = build_model(config.model, **arguments)
    if start:
        where = f"train.{'pretrained' if config.pretrained != 'none' else 'init_from'} = {start.provenance['file']}"
        apply_starting_weights(model, start, where)
        emit(
            f"starting from {where} (sha256 {start.provenance['sha256'][:12]}): "
            + (
                "head replaced for " + str(len(meta["class_names"])) + " classes"
                if start.head_replaced
                else "same classes, head kept"
            )
            + f"; loaded weights train at train.backbone_lr_scale = {config.backbone_lr_scale} x the rate"
            + (
                f", frozen for the first {config.freeze_backbone_epochs} epoch(s)"
                if config.freeze_backbone_epochs
                else ""
            )
        )
    # Measured on the plain model (SyncBatchNorm's forward would talk to the other ranks); checked below, when
    # the batch size and the memory left after the data are known.
    step_memory = estimate_step_memory(
        model, (channels, height, width), config=config, device=device, precision=precision, processes=world.size
    )
    if config.sync_batchnorm and world.size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
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
    emit(
        f"{config.model}: {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{len(train_images)} training images of shape {[channels, height, width]}; "
        f"{nbytes / 1e6:,.0f} MB of images "
        + ("kept in memory" if resident else "read from disk batch by batch")
        + f" (train.in_memory: {config.in_memory})"
    )

    length = run_length(len(train_images), config, world.size)
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
    test_counts = meta.get("counts", {}).get("test")
    if test_counts is not None:
        hint = (
            "a test/ folder, data.test_fraction or data.val_folder"
            if meta["dataset"] == "imagefolder"
            else "data.limit keeps fewer"
        )
        for line in small_test_split_warnings(test_counts, hint):
            emit(line)

    digest, resume_from = None, None
    if world.is_main:  # rank 0 reads the state and hands it to the others (they may be on other machines)
        extra = (start.provenance["sha256"] if start else "") + (f"|world {world.size}" if world.size > 1 else "")
        digest = run_digest(params, paths.prepared_dir, extra=extra)  # a state from another world size is not used
        resume_from = load_resume_state(paths.resume_state, digest, emit)
    resume_from = broadcast_object(resume_from, world)
    resumed_seconds = 0.0  # training time before the stop, where the state is used

    def on_resume(problem: str | None) -> None:  # fit's verdict on the state, before it applies any of it
        nonlocal resumed_seconds
        if problem is None:
            resumed_seconds = resume_from["elapsed_seconds"]
            emit(
                f"resuming at step {resume_from['step']} (epoch {resume_from['epoch'] + 1} of {length.epochs}) from "
                f"{paths.resume_state}: the run continues exactly where the last one stopped"
            )
            return
        emit(f"discarding resume state {paths.resume_state}: {problem}; training from the start")
        if world.is_main:
            discard_resume_state(paths.resume_state)

    writer = ResumeStateWriter(paths.resume_state, digest, emit) if world.is_main else None
    if world.is_main:
        shutil.rmtree(paths.tensorboard_dir, ignore_errors=True)  # one run's curves, not every run's appended
        reporter = EpochReporter(paths.train_log_dir, paths.tensorboard_dir, print_line=emit)
    else:
        reporter = SilentReporter()
    reporter.log_images(train_images.first(config.log_images).cpu())
    started = time.perf_counter()
    # Ctrl-C with several processes: torchrun ends them all; the state of the last finished epoch resumes.
    with stop_on_ctrl_c(emit) if world.size == 1 else contextlib.nullcontext(lambda: False) as stop_requested:
        try:
            records = fit(
                model,
                (train_images, train_labels),
                val,
                config=config,
                device=device,
                precision=precision,
                generator=generator,
                on_epoch=reporter,
                resume_from=resume_from,
                save_state=writer,
                should_stop=stop_requested,
                fine_tune=start is not None,
                world=world,
                on_resume=on_resume,
            )
        except StopRequested as stop:
            where = f"batch {stop.progress['batches_done']} of the epoch (step {stop.progress['step']})"
            emit(
                f"stopped after {where} with the state saved in {paths.resume_state}; run `dvc repro` again to "
                "continue from there"
                if writer is not None and writer.saved
                else f"stopped after {where}; its state could not be saved "
                f"(see the warning above): the next run starts "
                "from the last state that was saved, if any"
            )
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
    if not world.is_main:
        return
    # Training time of the whole run: a resumed run adds the time spent before the stop.
    train_seconds = time.perf_counter() - started + resumed_seconds
    reporter.close(
        {
            "train_seconds": train_seconds,
            "precision": precision,
            "device": device.type,
            "epochs": length.epochs,
            "batch_size": length.batch_size,
            "steps": length.total_steps,
            "processes": world.size,
            "images_per_second": sum(r["images_per_second"] for r in records) / len(records),
        }
    )
    save_checkpoint(
        paths.checkpoint,
        model,
        architecture=config.model,
        arguments=arguments,
        class_names=meta["class_names"],
        mean=mean,
        std=std,
        params=as_dict(params),
        extra={
            "train_seconds": train_seconds,
            "precision": precision,
            "device": describe_device(device),
            "epochs": length.epochs,
            "batch_size": length.batch_size,
            "start": start.provenance if start else None,
            "processes": world.size,
        },
    )
    shutil.rmtree(paths.resume_state.parent, ignore_errors=True)  # done: nothing to resume any more
    emit(f"saved {paths.checkpoint} after {train_seconds:.1f} s")
