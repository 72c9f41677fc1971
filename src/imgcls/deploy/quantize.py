"""int8 ONNX: ONNX Runtime's static quantization (QDQ format, per-channel int8 weights, uint8 activations),
calibrated on training images only (never the test split)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from .export import batch_for
from .onnx_session import onnx_session

CALIBRATION_BATCH = 20


def quantize_int8(onnx_path: Path, int8_path: Path, calibration_images01: np.ndarray) -> None:
    """Write ``int8_path``: ``onnx_path`` quantized with activation ranges from ``calibration_images01``
    (float32 [0, 1], (N, C, H, W), training images)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        """Calibration batches; ``set_range`` lets the quantizer take them a stride at a time."""

        def __init__(self):
            self.starts = list(range(0, len(calibration_images01), CALIBRATION_BATCH))
            self.set_range(0, len(self.starts))

        def __len__(self):
            return len(self.starts)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.pending = iter(self.starts[start_index:end_index])

        def get_next(self):
            start = next(self.pending, None)
            if start is None:
                return None
            batch = calibration_images01[start : start + CALIBRATION_BATCH]
            return {"images": np.ascontiguousarray(batch, dtype=np.float32)}

    logging.getLogger("root").setLevel(logging.ERROR)  # the quantizer logs every node it skips
    with tempfile.TemporaryDirectory(dir=int8_path.parent) as scratch:
        prepared = Path(scratch) / "preprocessed.onnx"
        # Shape inference and graph fusions first, as ONNX Runtime's quantization guide recommends.
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        # CalibStridedMinMax: collect one batch at a time and merge its min/max ranges into the running ones
        # instead of keeping every intermediate tensor of every calibration image (3 GB at 128 pixels); the
        # ranges come out the same. (CalibMaxIntermediateOutputs would drop the collected batches.)
        quantize_static(
            str(prepared),
            str(int8_path),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            extra_options={"CalibStridedMinMax": 1},
        )


def onnx_logits(path: Path, images, threads: int | None = None) -> np.ndarray:
    """Logits of the ONNX model at ``path`` for uint8 images (an array or an NpyReader), batch by batch."""
    session = onnx_session(path, threads)
    batch_size = batch_for(images.shape[2:])
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], dtype=np.float32) / 255
        outputs.append(session.run(None, {"images": batch})[0])
    return np.concatenate(outputs)
