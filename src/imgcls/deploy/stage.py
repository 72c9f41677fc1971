"""export stage: TorchScript + ONNX with normalization inside, parity-checked, batch-1 latency measured."""

from __future__ import annotations

import numpy as np
import torch

from ..cli import log
from ..fileio import atomic_dir, write_json
from ..model.checkpoint import load_checkpoint
from ..model.networks import TTAModel
from ..params import Params
from ..paths import ProjectPaths
from ..prepared import load_prepared
from ..runtime import set_threads
from .export import check_parity, export_onnx, export_torchscript, measure_latency


def export(params: Params, paths: ProjectPaths) -> None:
    config, emit = params.export, log("export")
    set_threads(params.base.threads)
    model, checkpoint = load_checkpoint(paths.checkpoint, "cpu")  # exports are fp32 CPU graphs
    if params.evaluate.tta:
        model = TTAModel(model).eval()
    prepared = load_prepared(paths.prepared_dir, ("test",))
    prepared.require_classes(checkpoint["class_names"], paths.checkpoint)
    images, _ = prepared.splits["test"]  # an NpyReader: only the parity images are read
    images01 = images.read(0, config.parity_images).astype(np.float32) / 255  # (N, C, H, W) in [0, 1]
    example = torch.from_numpy(images01[:2])
    with atomic_dir(paths.export_dir) as tmp:  # nothing is published unless parity holds
        torchscript_path, onnx_path = tmp / "model.torchscript.pt", tmp / "model.onnx"
        export_torchscript(model, example, torchscript_path)
        export_onnx(model, example, onnx_path, config.opset)
        parity = check_parity(model, torchscript_path, onnx_path, images01, config.parity_atol)
        latency = measure_latency(torchscript_path, onnx_path, images01[0], config.latency_calls)
        sizes = {"torchscript_bytes": torchscript_path.stat().st_size, "onnx_bytes": onnx_path.stat().st_size}
    write_json(paths.metrics_dir / "export.json", {"files": sizes, "parity": parity, "latency": latency,
                                                   "tta": params.evaluate.tta})
    emit(f"parity on {parity['images']} images: max |diff| torchscript {parity['torchscript']['max_abs_logit_diff']:.2e}, "
         f"onnx {parity['onnx']['max_abs_logit_diff']:.2e}; batch-1 median latency onnxruntime "
         f"{latency['onnxruntime_median_ms']:.3f} ms, torchscript {latency['torchscript_median_ms']:.3f} ms")
