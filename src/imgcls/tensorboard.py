"""What a stage shows in TensorBoard beside its files: its pictures (the PNGs it wrote to metrics/) as images
and its headline figures as scalars, in a run folder of its own (``ProjectPaths.stage_tensorboard_dir``), so
that `tensorboard --logdir data` shows the training curves (data/tensorboard) and every stage's pictures
together. The run is written into a temporary folder and renamed into place: never half-written."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .fileio import atomic_dir


def write_tensorboard_run(folder: Path, pictures: dict[str, Path], scalars: dict[str, float] | None = None) -> None:
    """Replace ``folder`` with a TensorBoard run holding each PNG of ``pictures`` (tag -> file) as an image and
    each of ``scalars`` (tag -> value) at step 0. Pictures that do not exist are left out."""
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    with atomic_dir(folder, clean_stale=True) as tmp:
        writer = SummaryWriter(str(tmp))
        try:
            for tag, path in pictures.items():
                if path.is_file():
                    with Image.open(path) as image:
                        pixels = np.asarray(image.convert("RGB"))
                    writer.add_image(tag, pixels, global_step=0, dataformats="HWC")
            for tag, value in (scalars or {}).items():
                if value is not None:
                    writer.add_scalar(tag, float(value), global_step=0)
        finally:
            writer.close()
