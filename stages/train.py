"""train stage: fit the model chosen in params.train on data/prepared/, log curves, save the checkpoint."""

import time

import torch

from imgcls.checkpoint import save_checkpoint
from imgcls.cli import log, run_stage
from imgcls.models import build_model
from imgcls.params import as_dict
from imgcls.prepare import load_prepared
from imgcls.reporting import EpochReporter
from imgcls.runtime import describe_device, resolve_device, resolve_precision, seed_everything
from imgcls.training import fit


def main() -> None:
    def body(params, paths):
        config, emit = params.train, log("train")
        generator = seed_everything(params.base.seed)
        device = resolve_device(params.base.device)
        precision = resolve_precision(config.precision, device)
        emit(f"device {describe_device(device)}, precision {precision} (train.precision: {config.precision})")

        prepared = load_prepared(paths.prepared_dir, ("train", "val"))
        meta = prepared.meta
        channels, height, width = meta["image_shape"]
        arguments = {"in_channels": channels, "num_classes": len(meta["class_names"]), "image_size": height,
                     "mean": meta["mean"], "std": meta["std"], "width": config.width}
        model = build_model(config.model, **arguments).to(device, memory_format=torch.channels_last)
        train_images, train_labels = (torch.from_numpy(a).to(device) for a in prepared.splits["train"])
        val = tuple(torch.from_numpy(a).to(device) for a in prepared.splits["val"]) if "val" in prepared.splits else None
        if config.model == "fast":
            model.init_whitening(train_images[:5000].float() / 255)
        emit(f"{config.model}: {sum(p.numel() for p in model.parameters()):,} parameters; "
             f"{len(train_images)} training images of shape {[channels, height, width]}")

        reporter = EpochReporter(paths.train_log_dir, paths.tensorboard_dir, print_line=emit)
        reporter.log_images(train_images[:config.log_images].cpu())
        started = time.perf_counter()
        records = fit(model, (train_images, train_labels), val, config=config, device=device,
                      precision=precision, generator=generator, on_epoch=reporter)
        train_seconds = time.perf_counter() - started
        reporter.close({"train_seconds": train_seconds, "precision": precision, "device": device.type,
                        "images_per_second": sum(r["images_per_second"] for r in records) / len(records)})
        save_checkpoint(paths.checkpoint, model, architecture=config.model, arguments=arguments,
                        class_names=meta["class_names"], mean=meta["mean"], std=meta["std"],
                        params=as_dict(params), extra={"train_seconds": train_seconds, "precision": precision})
        emit(f"saved {paths.checkpoint} after {train_seconds:.1f} s")

    run_stage("train", body)


if __name__ == "__main__":
    main()
