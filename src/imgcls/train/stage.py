"""train stage: fit the model chosen in params.train on data/prepared/, log curves, save the checkpoint."""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
import time
from typing import Callable, Iterator

import torch

from ..cli import log
from ..model.checkpoint import save_checkpoint
from ..model.networks import build_model
from ..params import Params, as_dict
from ..paths import ProjectPaths
from ..prepared import load_prepared
from ..runtime import available_memory, describe_device, resolve_device, resolve_precision, seed_everything, set_threads
from .batches import ResidentImages, StreamedImages, keep_resident
from .loop import StopRequested, fit
from .reporting import EpochReporter
from .resume import load_resume_state, run_digest, save_resume_state


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


def train(params: Params, paths: ProjectPaths) -> None:
    config, emit = params.train, log("train")
    set_threads(params.base.threads)
    generator = seed_everything(params.base.seed)
    device = resolve_device(params.base.device)
    precision = resolve_precision(config.precision, device)
    emit(f"device {describe_device(device)}, precision {precision} (train.precision: {config.precision})")

    prepared = load_prepared(paths.prepared_dir, ("train",), optional=("val",))
    meta = prepared.meta
    channels, height, width = meta["image_shape"]
    arguments = {"in_channels": channels, "num_classes": len(meta["class_names"]), "image_size": height,
                 "mean": meta["mean"], "std": meta["std"], "width": config.width,
                 "whiten_bias_epochs": config.whiten_bias_epochs}
    model = build_model(config.model, **arguments).to(device, memory_format=torch.channels_last)
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
    emit(f"{config.model}: {sum(p.numel() for p in model.parameters()):,} parameters; "
         f"{len(train_images)} training images of shape {[channels, height, width]}; "
         f"{nbytes / 1e6:,.0f} MB of images " + ("kept in memory" if resident else "read from disk batch by batch")
         + f" (train.in_memory: {config.in_memory})")

    digest = run_digest(params, paths.prepared_dir)
    resume_from = load_resume_state(paths.resume_state, digest, emit)
    if resume_from is not None:
        emit(f"resuming at step {resume_from['step']} (epoch {resume_from['epoch'] + 1} of {config.epochs}) from "
             f"{paths.resume_state}: the run continues exactly where the last one stopped")
    shutil.rmtree(paths.tensorboard_dir, ignore_errors=True)  # one run's curves, not every run's appended
    reporter = EpochReporter(paths.train_log_dir, paths.tensorboard_dir, print_line=emit)
    reporter.log_images(train_images.first(config.log_images).cpu())
    started = time.perf_counter()
    with stop_on_ctrl_c(emit) as stop_requested:
        try:
            records = fit(model, (train_images, train_labels), val, config=config, device=device,
                          precision=precision, generator=generator, on_epoch=reporter, resume_from=resume_from,
                          save_state=lambda state: save_resume_state(paths.resume_state, digest, state),
                          should_stop=stop_requested)
        except StopRequested as stop:
            emit(f"stopped after batch {stop.progress['batches_done']} of the epoch (step {stop.progress['step']}) "
                 f"with the state saved in {paths.resume_state}; run `dvc repro` again to continue from there")
            raise SystemExit(130) from None
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, keeping the last saved state
            emit("interrupted: " + ("run `dvc repro` again to continue from the last saved state"
                                    if paths.resume_state.is_file() else "no state saved yet; nothing to resume"))
            raise SystemExit(130) from None
    # Training time of the whole run: a resumed run adds the time spent before the stop.
    train_seconds = time.perf_counter() - started + (resume_from["elapsed_seconds"] if resume_from else 0.0)
    reporter.close({"train_seconds": train_seconds, "precision": precision, "device": device.type,
                    "images_per_second": sum(r["images_per_second"] for r in records) / len(records)})
    save_checkpoint(paths.checkpoint, model, architecture=config.model, arguments=arguments,
                    class_names=meta["class_names"], mean=meta["mean"], std=meta["std"],
                    params=as_dict(params), extra={"train_seconds": train_seconds, "precision": precision,
                           "device": describe_device(device)})
    shutil.rmtree(paths.resume_state.parent, ignore_errors=True)  # done: nothing to resume any more
    emit(f"saved {paths.checkpoint} after {train_seconds:.1f} s")
