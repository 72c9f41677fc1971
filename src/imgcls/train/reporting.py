"""Per-epoch reporting: one console line, dvclive metrics/plots for DVC, TensorBoard scalars and images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

HEADER = (
    f"{'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'val_loss':>8} {'val_acc':>7} {'images/s':>9} {'elapsed_s':>9}"
)


def format_epoch(record: dict) -> str:
    val_loss = f"{record['val_loss']:8.4f}" if "val_loss" in record else f"{'-':>8}"
    val_acc = f"{record['val_accuracy']:7.4f}" if "val_accuracy" in record else f"{'-':>7}"
    return (
        f"{record['epoch']:>5} {record['train_loss']:10.4f} {record['train_accuracy']:9.4f} {val_loss} {val_acc} "
        f"{record['images_per_second']:9.0f} {record['elapsed_seconds']:9.1f}"
    )


class EpochReporter:
    """Console + dvclive + TensorBoard, fed one epoch record at a time."""

    SCALARS = {
        "train_loss": "train/loss",
        "train_accuracy": "train/accuracy",
        "val_loss": "val/loss",
        "val_accuracy": "val/accuracy",
    }

    def __init__(self, dvclive_dir: Path, tensorboard_dir: Path, print_line: Callable[[str], None] = print):
        from dvclive import Live
        from torch.utils.tensorboard import SummaryWriter

        # dvcyaml=None: dvc.yaml declares the plots itself; save_dvc_exp=False: the stage is run by DVC.
        self.live = Live(str(dvclive_dir), dvcyaml=None, save_dvc_exp=False, report=None)
        self.writer = SummaryWriter(str(tensorboard_dir))
        self.print_line = print_line
        self.print_line(HEADER)

    def log_images(self, images_uint8: torch.Tensor, tag: str = "samples") -> None:
        from torchvision.utils import make_grid

        if len(images_uint8):
            grid = make_grid(images_uint8.float() / 255, nrow=int(len(images_uint8) ** 0.5), padding=1)
            self.writer.add_image(tag, grid, global_step=0)

    def __call__(self, record: dict) -> None:
        self.print_line(format_epoch(record))
        for key, name in self.SCALARS.items():
            if key in record:
                self.live.log_metric(name, record[key])
                self.writer.add_scalar(name, record[key], record["epoch"])
        self.writer.add_scalar("train/images_per_second", record["images_per_second"], record["epoch"])
        self.live.next_step()

    def close(self, summary: dict) -> None:
        for key, value in summary.items():
            self.live.summary[key] = value
        self.live.make_summary()
        self.live.end()
        self.writer.flush()
        self.writer.close()
