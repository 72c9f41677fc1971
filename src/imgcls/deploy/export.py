"""TorchScript and ONNX exports, checked for parity against the PyTorch model and timed at batch 1.

The exported graphs take float images in [0, 1], shape (N, C, H, W): normalization is inside the model.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from .batches import in_batches
from .metadata import TORCHSCRIPT_EXTRA_FILE
from .onnx_session import onnx_logits, onnx_session


@contextlib.contextmanager
def quiet_torchscript_deprecation() -> Iterator[None]:
    """torch.jit's FutureWarnings silenced inside the block only. torch.jit is deprecated in favour of
    torch.export, but TorchScript files are still what C++ and mobile runtimes load; the deprecation warnings
    say nothing a user of this stage can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        yield


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, facts: dict) -> None:
    """A traced TorchScript file carrying ``facts`` (class names, input size, ...) as an extra file."""
    with quiet_torchscript_deprecation(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(path), _extra_files={TORCHSCRIPT_EXTRA_FILE: json.dumps(facts)})


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    # The TorchScript-based exporter (dynamo=False) writes one self-contained file and needs no onnxscript.
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset,
        dynamo=False,
    )


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    return {
        "max_abs_logit_diff": float(np.abs(reference - candidate).max()) if reference.size else 0.0,
        "same_predictions": bool((reference.argmax(1) == candidate.argmax(1)).all()),
        "prediction_mismatches": int((reference.argmax(1) != candidate.argmax(1)).sum()),
    }


def check_parity(model: nn.Module, torchscript_path: Path, onnx_path: Path, images01: np.ndarray, atol: float) -> dict:
    """Compare logits of PyTorch (fp32, eval), TorchScript and ONNX Runtime on ``images01`` (float32 [0, 1]);
    an ExportError when an export differs by more than ``atol`` or predicts another class."""
    with quiet_torchscript_deprecation(), torch.no_grad():
        reference = in_batches(lambda x: model(torch.from_numpy(x)).numpy(), images01)
        scripted = torch.jit.load(str(torchscript_path)).eval()
        torchscript_logits = in_batches(lambda x: scripted(torch.from_numpy(x)).numpy(), images01)
    result = {
        "images": int(len(images01)),
        "atol": atol,
        "torchscript": parity(reference, torchscript_logits),
        "onnx": parity(reference, onnx_logits(onnx_path, images01)),
    }
    for runtime in ("torchscript", "onnx"):
        check = result[runtime]
        if check["max_abs_logit_diff"] > atol or not check["same_predictions"]:
            raise ExportError(
                f"{runtime} export differs from the PyTorch model on {len(images01)} test images: max |logit diff| "
                f"{check['max_abs_logit_diff']:.3g} (allowed {atol:g}), {check['prediction_mismatches']} different "
                "predicted classes; the export is not written. Check for ops that differ between runtimes"
            )
    return result


def median_latency_ms(call, calls: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        call()
    timings = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def onnx_median_ms(onnx_path: Path, image01: np.ndarray, calls: int) -> float:
    """Median batch-1 latency of ONNX Runtime with one thread, for one image (C, H, W) in [0, 1]."""
    batch = np.ascontiguousarray(image01[None], dtype=np.float32)  # (1, C, H, W)
    session = onnx_session(onnx_path, threads=1)
    return median_latency_ms(lambda: session.run(None, {"images": batch}), calls)


def torchscript_median_ms(torchscript_path: Path, image01: np.ndarray, calls: int) -> float:
    """Median batch-1 latency of TorchScript with one thread (torch's thread count restored afterwards)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image01[None], dtype=np.float32))  # (1, C, H, W)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_torchscript_deprecation():
            scripted = torch.jit.load(str(torchscript_path)).eval()
        with torch.no_grad():
            return median_latency_ms(lambda: scripted(tensor), calls)
    finally:
        torch.set_num_threads(previous_threads)


def measure_latency(torchscript_path: Path, onnx_path: Path, image01: np.ndarray, calls: int) -> dict:
    """Median batch-1 latency with one thread for ONNX Runtime and TorchScript."""
    return {
        "calls": calls,
        "threads": 1,
        "onnxruntime_median_ms": onnx_median_ms(onnx_path, image01, calls),
        "torchscript_median_ms": torchscript_median_ms(torchscript_path, image01, calls),
    }
